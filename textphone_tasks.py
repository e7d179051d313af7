"""TextPhone's world: the phone's initial data, the 14 task templates and their oracle policies.

A template is (gen, check, policy, complexity): gen(rng, data) -> (params, task text) may also edit the data the
episode starts from; check(data, params) -> bool is the programmatic success check; policy(env, params) -> the
oracle's next action from the current screen, or None when the goal can no longer be reached; the step cap is
int(10 x complexity). ID templates are trained and tested on (disjoint seeds); the OOD ones are held out.
"""
import re

from android_env import BTN, RADIO, STATUS_DONE, SW, act

# app names as android_world's launcher (adb_utils._PATTERN_TO_ACTIVITY) knows them
CONTACTS, CLOCK, NOTES_APP, MESSAGES, SETTINGS_APP, EXPENSES_APP, FILES_APP = (
    "Contacts", "Clock", "Markor", "Simple SMS Messenger", "Settings", "Pro Expense", "Files")
SETTINGS = ("Wi-Fi", "Bluetooth", "Airplane mode", "Dark theme")
CATEGORIES = ("Food", "Transport", "Shopping", "Bills", "Health", "Fun")
FIRST = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen",
         "Liam", "Maria", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor")
LAST = ("Smith", "Jones", "Brown", "Garcia", "Miller", "Davis", "Lopez", "Wilson", "Moore", "Clark")
NOTES = ("Groceries", "Trip ideas", "Meeting", "Books", "Recipes", "Gym plan", "Birthday", "Garden",
         "Budget", "Movies", "Packing list", "Chores", "Passwords hint", "Podcasts")
BODIES = ("milk, eggs, bread", "call the plumber", "ask about the deadline", "read two chapters",
          "buy a gift", "water the plants", "pay rent on Friday", "pick up the keys")
TEXTS = ("See you at 6", "Running late", "Call me back", "Happy birthday!", "Lunch tomorrow?",
         "Thanks a lot", "On my way", "Meeting moved to 3pm", "Did you get the tickets?", "Good night")
EXPENSES = ("Lunch", "Taxi", "Groceries", "Cinema", "Pharmacy", "Electricity", "Coffee", "Bus pass",
            "Shoes", "Internet", "Dinner", "Concert", "Vitamins", "Train ticket")
FILES = ("report.pdf", "photo_01.jpg", "notes.txt", "budget.xlsx", "slides.pptx", "song.mp3",
         "invoice_2024.pdf", "draft.docx", "map.png", "backup.zip", "resume.pdf", "video.mp4")
PREFIXES = ("final_", "old_", "copy_", "v2_", "shared_")


def _phone(rng):
    return f"555-{int(rng.integers(1000, 10000))}"


def digits(s):
    return re.sub(r"\D", "", s or "")


def by_id(items, i):
    return next((it for it in items if it["id"] == i), None)


def random_data(rng):
    """Initial phone contents; every item has a stable id so screens survive deletions."""
    d = {"next_id": 0, "answer": None}

    def ids(items):
        for it in items:
            it["id"] = d["next_id"]
            d["next_id"] += 1
        return items
    names = [f"{FIRST[i // len(LAST)]} {LAST[i % len(LAST)]}"
             for i in rng.choice(len(FIRST) * len(LAST), size=int(rng.integers(4, 10)), replace=False)]
    d["contacts"] = ids([{"name": n, "phone": _phone(rng)} for n in sorted(names)])
    times = sorted({f"{int(rng.integers(5, 12)):02d}:{int(rng.choice([0, 15, 30, 45])):02d}"
                    for _ in range(int(rng.integers(1, 5)))})
    d["alarms"] = ids([{"time": t, "on": bool(rng.random() < 0.6)} for t in times])
    d["notes"] = ids([{"title": NOTES[i], "body": BODIES[int(rng.integers(len(BODIES)))]}
                      for i in rng.choice(len(NOTES), size=int(rng.integers(3, 9)), replace=False)])
    d["messages"] = [{"to": names[int(rng.integers(len(names)))], "text": TEXTS[int(rng.integers(len(TEXTS)))]}
                     for _ in range(int(rng.integers(2, 6)))]
    d["settings"] = {k: bool(rng.random() < 0.5) for k in SETTINGS}
    d["expenses"] = ids([{"name": EXPENSES[i], "amount": int(rng.integers(2, 120)),
                          "category": CATEGORIES[int(rng.integers(len(CATEGORIES)))]}
                         for i in rng.choice(len(EXPENSES), size=int(rng.integers(3, 9)), replace=False)])
    d["files"] = ids([{"name": FILES[i]} for i in rng.choice(len(FILES), size=int(rng.integers(4, 9)),
                                                              replace=False)])
    return d


# ----------------------------------------------------------------------------- oracle helpers (read the screen)

def _find(env, **want):
    """Index of the first element whose fields match want (text=..., content_description=..., ...)."""
    return next((i for i, e in enumerate(env.elements()) if all(e.get(k) == v for k, v in want.items())), None)


def _click(env, **want):
    i = _find(env, **want)
    return None if i is None else act("click", index=i)


def _fill(env, wanted, submit):
    """Type each wrong field of the form on top (replacing what it holds), then press submit."""
    f = env.stack[-1]["fields"]
    for label, value in wanted.items():
        if f.get(label) != value:
            clear = {"clear_text": True} if f.get(label) else {}
            return act("input_text", text=value, index=_find(env, hint_text=label, is_editable=True), **clear)
    return _click(env, text=submit, class_name=BTN)


def _seek(env, item, click=None):
    """Scroll the current list until item is on the page, then click it (or click(env, item))."""
    items, _, p = env.page_items()
    k = next((j for j, it in enumerate(items) if it is item or it == item), None)
    if k is None:
        return None
    if k // env.PAGE != p:
        return act("scroll", direction="down" if k // env.PAGE > p else "up")
    if click:
        return click(env, item)
    key = item.get("id", item.get("to"))
    for i, e in enumerate(env.elements()):
        if e["do"] and e["do"][0] == "push" and e["do"][1].get("id", e["do"][1].get("to")) == key:
            return act("click", index=i)
    return None


def _top(env):
    return env.stack[-1]


def _open(app):
    return act("open_app", app_name=app)


# ----------------------------------------------------------------------------- task templates
# Each template: gen(rng, data) -> (params, task text), check(data, params) -> bool,
# policy(env, params) -> next oracle action or None (unsolvable), complexity (step budget = 10 x complexity).

def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _new_name(rng, d):
    taken = {c["name"] for c in d["contacts"]}
    while True:
        n = f"{_pick(rng, FIRST)} {_pick(rng, LAST)}"
        if n not in taken:
            return n


def _contact(d, name):
    return next((c for c in d["contacts"] if c["name"] == name), None)


# add_contact
def gen_add_contact(rng, d):
    p = {"name": _new_name(rng, d), "phone": _phone(rng)}
    return p, f"Add a contact named {p['name']} with phone number {p['phone']}."


def check_add_contact(d, p):
    return any(c["name"] == p["name"] and c["phone"] == p["phone"] for c in d["contacts"])


def pol_add_contact(env, p):
    if check_add_contact(env.data, p):
        return STATUS_DONE
    s = _top(env)
    if s["name"] == "contact_form" and s["id"] is None:
        return _fill(env, {"Name": p["name"], "Phone": p["phone"]}, "Save")
    if s["name"] == "contacts":
        return _click(env, content_description="Add contact")
    return _open(CONTACTS)


# delete_contact / delete_note (a named item goes, nothing else does)
def _gen_delete(key, field, what):
    def gen(rng, d):
        target = _pick(rng, d[key])
        p = {"target": target[field], "target_id": target["id"], "keep": [it["id"] for it in d[key]
                                                                           if it is not target]}
        return p, what.format(target[field])
    return gen


def _check_delete(key):
    def check(d, p):
        ids = {it["id"] for it in d[key]}
        return p["target_id"] not in ids and all(i in ids for i in p["keep"])
    return check


def _pol_delete(key, app, list_screen, item_screen):
    def pol(env, p):
        d = env.data
        if _check_delete(key)(d, p):
            return STATUS_DONE
        if not all(by_id(d[key], i) for i in p["keep"]):
            return None  # something else was deleted: no way back
        s, target = _top(env), by_id(d[key], p["target_id"])
        if s["name"] == item_screen and s["id"] == target["id"]:
            return _click(env, text="Delete")
        if s["name"] == list_screen:
            return _seek(env, target)
        return _open(app)
    return pol


# set_alarm
def gen_set_alarm(rng, d):
    off = [a["time"] for a in d["alarms"] if not a["on"]]
    if off and rng.random() < 0.5:   # that time exists, switched off: switching it on is the short way
        t = _pick(rng, off)
        return {"time": t, "existing": True}, f"Set an alarm for {t}."
    taken = {a["time"] for a in d["alarms"]}
    while True:
        t = f"{int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}"
        if t not in taken:
            return {"time": t}, f"Set an alarm for {t}."


def check_set_alarm(d, p):
    return any(a["time"] == p["time"] and a["on"] for a in d["alarms"])


def pol_set_alarm(env, p):
    if check_set_alarm(env.data, p):
        return STATUS_DONE
    s = _top(env)
    off = next((a for a in env.data["alarms"] if a["time"] == p["time"]), None)
    if s["name"] == "clock" and off is not None:  # it exists but is off: switch it on
        return _seek(env, off, lambda e, a: _click(e, content_description=f"{a['time']} alarm"))
    if s["name"] == "alarm_form":
        h, m = p["time"].split(":")
        return _fill(env, {"Hour": h, "Minute": m}, "Save")
    if s["name"] == "clock":
        return _click(env, content_description="Add alarm")
    return _open(CLOCK)


# disable_alarm (OOD)
def gen_disable_alarm(rng, d):
    a = _pick(rng, d["alarms"])
    a["on"] = True
    return {"time": a["time"], "id": a["id"]}, f"Turn off the {a['time']} alarm (do not delete it)."


def check_disable_alarm(d, p):
    a = by_id(d["alarms"], p["id"])
    return a is not None and not a["on"]


def pol_disable_alarm(env, p):
    a = by_id(env.data["alarms"], p["id"])
    if a is None:
        return None
    if not a["on"]:
        return STATUS_DONE
    s = _top(env)
    if s["name"] == "alarm" and s["id"] == a["id"]:
        return _click(env, content_description=f"{a['time']} alarm")
    if s["name"] == "clock":
        return _seek(env, a, lambda e, x: _click(e, content_description=f"{x['time']} alarm"))
    return _open(CLOCK)


# send_message
def _count_msgs(d, to, text):
    return sum(m["to"] == to and m["text"] == text for m in d["messages"])


def gen_send_message(rng, d):
    c, text = _pick(rng, d["contacts"]), _pick(rng, TEXTS)
    p = {"to": c["name"], "text": text, "before": _count_msgs(d, c["name"], text)}
    return p, f"Send a message to {c['name']} saying \"{text}\"."


def check_send_message(d, p):
    return _count_msgs(d, p["to"], p["text"]) > p["before"]


def _pol_send(env, to, text):
    s = _top(env)
    if s["name"] == "compose":
        return _fill(env, {"To": to, "Message": text}, "Send")
    if s["name"] == "thread" and s["to"] == to:
        return _fill(env, {"Message": text}, "Send")
    if s["name"] == "messages":
        return _click(env, content_description="New message")
    return _open(MESSAGES)


def pol_send_message(env, p):
    if check_send_message(env.data, p):
        return STATUS_DONE
    if _contact(env.data, p["to"]) is None:
        return None
    return _pol_send(env, p["to"], p["text"])


# share_contact_number (OOD, two apps: read a number in Contacts, send it in Messages)
def gen_share_number(rng, d):
    a, b = rng.choice(len(d["contacts"]), size=2, replace=False)
    a, b = d["contacts"][int(a)], d["contacts"][int(b)]
    p = {"source": a["name"], "to": b["name"], "phone": a["phone"], "before": _count_msgs(d, b["name"], a["phone"])}
    return p, f"Send {a['name']}'s phone number to {b['name']} in a message (just the number)."


def check_share_number(d, p):
    return _count_msgs(d, p["to"], p["phone"]) > p["before"]


def pol_share_number(env, p):
    if check_share_number(env.data, p):
        return STATUS_DONE
    src = _contact(env.data, p["source"])
    if _contact(env.data, p["to"]) is None or src is None or src["phone"] != p["phone"]:
        return None
    s = _top(env)
    if s["name"] in ("compose", "messages") or (s["name"] == "thread" and s["to"] == p["to"]):
        return _pol_send(env, p["to"], p["phone"])
    if s["name"] == "contact" and s["id"] == src["id"]:
        return _open(MESSAGES)
    if s["name"] == "contacts":
        return _seek(env, src)
    return _open(CONTACTS)


# toggle_setting
def gen_toggle(rng, d):
    k, on = _pick(rng, SETTINGS), bool(rng.random() < 0.5)
    d["settings"][k] = not on
    return {"setting": k, "on": on}, f"Turn {k} {'on' if on else 'off'}."


def check_toggle(d, p):
    return d["settings"][p["setting"]] == p["on"]


def pol_toggle(env, p):
    if check_toggle(env.data, p):
        return STATUS_DONE
    if _top(env)["name"] == "settings":
        return _click(env, text=p["setting"], class_name=SW)
    return _open(SETTINGS_APP)


# add_expense
def gen_add_expense(rng, d):
    p = {"item": _pick(rng, EXPENSES), "amount": str(int(rng.integers(3, 200))), "category": _pick(rng, CATEGORIES)}
    return p, f"Add an expense \"{p['item']}\" of {p['amount']} in category {p['category']}."


def check_add_expense(d, p):
    return any(e["name"] == p["item"] and str(e["amount"]) == p["amount"] and e["category"] == p["category"]
               for e in d["expenses"])


def pol_add_expense(env, p):
    if check_add_expense(env.data, p):
        return STATUS_DONE
    s = _top(env)
    if s["name"] == "expense_form":
        if s["cat"] != p["category"] and s["fields"] == {"Name": p["item"], "Amount": p["amount"]}:
            return _click(env, text=p["category"], class_name=RADIO)
        return _fill(env, {"Name": p["item"], "Amount": p["amount"]}, "Save")
    if s["name"] == "expenses":
        return _click(env, content_description="Add expense")
    return _open(EXPENSES_APP)


# delete_expenses_category (OOD, repeated deletions)
def gen_delete_category(rng, d):
    cat = _pick(rng, CATEGORIES)
    for e in rng.choice(len(d["expenses"]), size=min(len(d["expenses"]), 2 + int(rng.integers(2))), replace=False):
        d["expenses"][int(e)]["category"] = cat
    p = {"category": cat, "keep": [e["id"] for e in d["expenses"] if e["category"] != cat]}
    return p, f"Delete all expenses in category {cat}."


def check_delete_category(d, p):
    ids = {e["id"] for e in d["expenses"]}
    return all(e["category"] != p["category"] for e in d["expenses"]) and all(i in ids for i in p["keep"])


def pol_delete_category(env, p):
    d = env.data
    if check_delete_category(d, p):
        return STATUS_DONE
    if not all(by_id(d["expenses"], i) for i in p["keep"]):
        return None
    s = _top(env)
    if s["name"] == "expense" and by_id(d["expenses"], s["id"])["category"] == p["category"]:
        return _click(env, text="Delete")
    if s["name"] == "expenses":
        return _seek(env, next(e for e in d["expenses"] if e["category"] == p["category"]))
    return _open(EXPENSES_APP)


# create_note
def gen_create_note(rng, d):
    taken = {n["title"] for n in d["notes"]}
    title = _pick(rng, [t for t in NOTES if t not in taken])
    p = {"title": title, "body": _pick(rng, BODIES)}
    return p, f"Create a note titled \"{title}\" with the text \"{p['body']}\"."


def check_create_note(d, p):
    return any(n["title"] == p["title"] and n["body"] == p["body"] for n in d["notes"])


def pol_create_note(env, p):
    if check_create_note(env.data, p):
        return STATUS_DONE
    s = _top(env)
    if s["name"] == "note_form":
        return _fill(env, {"Title": p["title"], "Text": p["body"]}, "Save")
    if s["name"] == "notes":
        return _click(env, content_description="New note")
    return _open(NOTES_APP)


# rename_file
def gen_rename_file(rng, d):
    f = _pick(rng, d["files"])
    p = {"old": f["name"], "new": _pick(rng, PREFIXES) + f["name"], "id": f["id"], "n": len(d["files"])}
    return p, f"Rename the file {p['old']} to {p['new']}."


def check_rename_file(d, p):
    names = [f["name"] for f in d["files"]]
    return p["new"] in names and p["old"] not in names and len(names) == p["n"]


def pol_rename_file(env, p):
    if check_rename_file(env.data, p):
        return STATUS_DONE
    f = by_id(env.data["files"], p["id"])
    if f is None or len(env.data["files"]) != p["n"]:
        return None
    s = _top(env)
    if s["name"] == "file_form" and s["id"] == f["id"]:
        return _fill(env, {"File name": p["new"]}, "OK")
    if s["name"] == "file" and s["id"] == f["id"]:
        return _click(env, text="Rename")
    if s["name"] == "files":
        return _seek(env, f)
    return _open(FILES_APP)


# update_contact_phone (OOD: the edit form)
def gen_update_phone(rng, d):
    c = _pick(rng, d["contacts"])
    new = _phone(rng)
    while new == c["phone"]:
        new = _phone(rng)
    return {"name": c["name"], "id": c["id"], "phone": new}, f"Change {c['name']}'s phone number to {new}."


def check_update_phone(d, p):
    c = by_id(d["contacts"], p["id"])
    return c is not None and c["name"] == p["name"] and c["phone"] == p["phone"]


def pol_update_phone(env, p):
    if check_update_phone(env.data, p):
        return STATUS_DONE
    c = by_id(env.data["contacts"], p["id"])
    if c is None:
        return None
    s = _top(env)
    if s["name"] == "contact_form" and s["id"] == c["id"]:
        return _fill(env, {"Name": p["name"], "Phone": p["phone"]}, "Save")
    if s["name"] == "contact" and s["id"] == c["id"]:
        return _click(env, text="Edit")
    if s["name"] == "contacts":
        return _seek(env, c)
    return _open(CONTACTS)


# answer_phone (a question: look it up, answer, finish)
def gen_answer_phone(rng, d):
    c = _pick(rng, d["contacts"])
    return {"name": c["name"], "phone": c["phone"]}, f"What is {c['name']}'s phone number? Answer with the number."


def check_answer_phone(d, p):
    return d["answer"] is not None and digits(d["answer"]) == digits(p["phone"])


def pol_answer_phone(env, p):
    if check_answer_phone(env.data, p):
        return STATUS_DONE
    c = _contact(env.data, p["name"])
    if c is None:
        return None
    s = _top(env)
    if s["name"] == "contact" and s["id"] == c["id"]:
        return act("answer", text=c["phone"])
    if s["name"] == "contacts":
        return _seek(env, c)
    return _open(CONTACTS)


TEMPLATES = {  # name: (gen, check, oracle policy, complexity)
    "add_contact": (gen_add_contact, check_add_contact, pol_add_contact, 1.0),
    "delete_contact": (_gen_delete("contacts", "name", "Delete the contact {}."), _check_delete("contacts"),
                       _pol_delete("contacts", CONTACTS, "contacts", "contact"), 1.0),
    "set_alarm": (gen_set_alarm, check_set_alarm, pol_set_alarm, 1.0),
    "create_note": (gen_create_note, check_create_note, pol_create_note, 1.0),
    "delete_note": (_gen_delete("notes", "title", "Delete the note titled \"{}\"."), _check_delete("notes"),
                    _pol_delete("notes", NOTES_APP, "notes", "note"), 1.0),
    "send_message": (gen_send_message, check_send_message, pol_send_message, 1.0),
    "toggle_setting": (gen_toggle, check_toggle, pol_toggle, 0.5),
    "add_expense": (gen_add_expense, check_add_expense, pol_add_expense, 1.0),
    "rename_file": (gen_rename_file, check_rename_file, pol_rename_file, 1.0),
    "answer_phone": (gen_answer_phone, check_answer_phone, pol_answer_phone, 1.0),
    # held out (OOD): new screens/interactions, a new goal over a known move (disable_alarm: set_alarm's
    # switch), or two apps in one task; bench/probe_ood_skills.py lists the moves no ID oracle makes
    "update_contact_phone": (gen_update_phone, check_update_phone, pol_update_phone, 1.0),
    "share_contact_number": (gen_share_number, check_share_number, pol_share_number, 1.5),
    "disable_alarm": (gen_disable_alarm, check_disable_alarm, pol_disable_alarm, 0.5),
    "delete_expenses_category": (gen_delete_category, check_delete_category, pol_delete_category, 2.0),
}
OOD_TEMPLATES = ("update_contact_phone", "share_contact_number", "disable_alarm", "delete_expenses_category")
ID_TEMPLATES = tuple(t for t in TEMPLATES if t not in OOD_TEMPLATES)
