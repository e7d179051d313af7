"""TextPhone: an offline STAND-IN for AndroidWorld, not the real benchmark.

Seven small apps (named as android_world's launcher names them) whose state is plain Python data, rendered as
T3A's numbered UI-element list and driven by the same JSON actions as android_env.AndroidWorldEnv. It exists
so the method can be trained and tested here, where no emulator runs. Task templates: textphone_tasks.py
(ID and OOD differ by template). A screen is one function of SCREENS, an element's effect one of EFFECTS and
an action type one of ACTIONS.
"""
import copy

import numpy as np

import envs
from android_env import (BTN, EDIT, HINT, IMG, RADIO, SW, TV, STATUS_DONE, act, parse_action, render,
                         state_similarity)
from textphone_tasks import (CATEGORIES, CLOCK, CONTACTS, EXPENSES_APP, FILES_APP, ID_TEMPLATES, MESSAGES,
                             NOTES_APP, OOD_TEMPLATES, SETTINGS, SETTINGS_APP, TEMPLATES, by_id, digits,
                             random_data)

RULES = """You operate a phone (TextPhone, a text stand-in for an Android emulator) to complete the user's goal.
Each screen is a numbered list of UI elements:
UI element i: UIElement(text=..., content_description=..., class_name=..., hint_text=..., is_checked=...,
is_clickable=..., is_editable=...)
Apps: Contacts, Clock, Markor (notes), Simple SMS Messenger, Settings, Pro Expense, Files.
Answer with one JSON action per turn (optionally after "Action:"):
{"action_type": "click", "index": i}   tap element i (double_tap too; long_press does nothing), or "x", "y":
    element i fills the rows y = 200 + 100 i to 300 + 100 i
{"action_type": "input_text", "text": "...", "index": i}   type into field i after what it holds
    ("clear_text": true replaces it); the Enter pressed after typing does nothing here, nor does keyboard_enter
{"action_type": "navigate_back"}  {"action_type": "navigate_home"}  {"action_type": "wait"} (does nothing)
{"action_type": "scroll", "direction": "down"}  page the screen's list down or up (swipe goes the other way)
{"action_type": "open_app", "app_name": "Markor"}
{"action_type": "answer", "text": "..."}   record your answer to a question
{"action_type": "status", "goal_status": "complete"}   end the episode; the goal is then checked. "infeasible"
    ends it as a failure, and so does running out of steps (as in AndroidWorld's runner).
A malformed or impossible action wastes a step and leaves the screen unchanged."""

APPS = {CONTACTS: "contacts", CLOCK: "clock", NOTES_APP: "notes", MESSAGES: "messages", SETTINGS_APP: "settings",
        EXPENSES_APP: "expenses", FILES_APP: "files"}  # app -> its first screen
# open_app names: case-insensitive, plus the launcher's other names for these apps
LAUNCHER = {**{a.lower(): a for a in APPS}, "simple sms": MESSAGES, "pro expense app": EXPENSES_APP,
            "system settings": SETTINGS_APP}
ROW_TOP, ROW_H = 200, 100     # pseudo layout so clicks by x,y map to an element row


def _el(text=None, desc=None, cls=TV, click=False, edit=False, do=None, hint=None, checked=None):
    """A UI element: T3A's fields, plus `do`, the effect of tapping it (a key of EFFECTS and its argument)."""
    return {"text": text, "content_description": desc, "class_name": cls, "hint_text": hint,
            "is_checked": bool(checked), "is_checkable": checked is not None, "is_clickable": click,
            "is_editable": edit, "do": do}


def _field(label, value):
    return _el(value or None, None, EDIT, True, True, ("field", label), hint=label)


def _error(s):
    return [_el(s["error"])] if s.get("error") else []


def _form_screen(title, s, submit, effect):
    """A form: its title, a field per entry of s["fields"] (in order), the submit button, the last error."""
    return ([_el(title)] + [_field(label, value) for label, value in s["fields"].items()] +
            [_el(submit, None, BTN, True, do=(effect, None))] + _error(s))


def _alarm_switch(a):
    return _el(None, f"{a['time']} alarm", SW, True, do=("toggle_alarm", a["id"]), checked=a["on"])


def _form(*fields):
    return {"fields": {f: "" for f in fields}}


# ----------------------------------------------------------------------------- lists (scroll by pages)

def _threads(d):
    last = {}
    for m in d["messages"]:  # latest message per contact, most recent thread first
        last.pop(m["to"], None)
        last[m["to"]] = m
    return list(reversed(list(last.values())))


LISTS = {  # screen: (items of the data, row label -> (text, description); None = alarm rows, screen an item opens)
    "contacts": (lambda d: d["contacts"], lambda c: (c["name"], None), lambda c: {"name": "contact", "id": c["id"]}),
    "clock": (lambda d: d["alarms"], None, lambda a: {"name": "alarm", "id": a["id"]}),
    "notes": (lambda d: d["notes"], lambda n: (n["title"], None), lambda n: {"name": "note", "id": n["id"]}),
    "messages": (_threads, lambda t: (t["to"], t["text"]),
                 lambda t: {"name": "thread", "to": t["to"], "fields": {"Message": ""}}),
    "expenses": (lambda d: d["expenses"], lambda e: (e["name"], f"{e['amount']} · {e['category']}"),
                 lambda e: {"name": "expense", "id": e["id"]}),
    "files": (lambda d: d["files"], lambda f: (f["name"], None), lambda f: {"name": "file", "id": f["id"]}),
}


def _list_screen(env, title, add=None):
    items, shown, p = env.page_items()
    _, label, opener = LISTS[env.stack[-1]["name"]]
    els = [_el(title)]
    for it in shown:
        if label is None:  # alarm row: the time, then its on/off switch
            els += [_el(it["time"], None, TV, True, do=("push", opener(it))), _alarm_switch(it)]
        else:
            t, desc = label(it)
            els.append(_el(t, desc, TV, True, do=("push", opener(it))))
    if not items:
        els.append(_el("Nothing here yet"))
    elif len(items) > env.PAGE:
        els.append(_el(f"Showing {p * env.PAGE + 1}-{p * env.PAGE + len(shown)} of {len(items)}"))
    if add:
        els.append(_el(None, add[0], IMG, True, do=("push", add[1])))
    return els


# ----------------------------------------------------------------------------- screens: (env, top of stack) -> elements

def _home(env, s):
    return [_el("Home")] + [_el(a, None, TV, True, do=("open", a)) for a in APPS]


def _contacts(env, s):
    return _list_screen(env, "Contacts", ("Add contact", {"name": "contact_form", "id": None,
                                                          **_form("Name", "Phone")}))


def _contact(env, s):
    c = by_id(env.data["contacts"], s["id"])
    return [_el(c["name"]), _el(c["phone"], "Phone"),
            _el("Edit", None, BTN, True, do=("push", {"name": "contact_form", "id": c["id"],
                                                      "fields": {"Name": c["name"], "Phone": c["phone"]}})),
            _el("Message", None, BTN, True, do=("push", {"name": "compose",
                                                         "fields": {"To": c["name"], "Message": ""}})),
            _el("Delete", None, BTN, True, do=("delete", ("contacts", c["id"])))]


def _contact_form(env, s):
    return _form_screen("New contact" if s["id"] is None else "Edit contact", s, "Save", "save_contact")


def _clock(env, s):
    return _list_screen(env, "Alarms", ("Add alarm", {"name": "alarm_form", **_form("Hour", "Minute")}))


def _alarm(env, s):
    a = by_id(env.data["alarms"], s["id"])
    return [_el(a["time"]), _alarm_switch(a), _el("Delete", None, BTN, True, do=("delete", ("alarms", a["id"])))]


def _alarm_form(env, s):
    return _form_screen("New alarm", s, "Save", "save_alarm")


def _notes(env, s):
    return _list_screen(env, "Notes", ("New note", {"name": "note_form", **_form("Title", "Text")}))


def _note(env, s):
    n = by_id(env.data["notes"], s["id"])
    return [_el(n["title"]), _el(n["body"], "Text"), _el("Delete", None, BTN, True, do=("delete", ("notes", n["id"])))]


def _note_form(env, s):
    return _form_screen("New note", s, "Save", "save_note")


def _messages(env, s):
    return _list_screen(env, "Messages", ("New message", {"name": "compose", **_form("To", "Message")}))


def _thread(env, s):
    texts = [m["text"] for m in env.data["messages"] if m["to"] == s["to"]][-env.PAGE:]
    return ([_el(s["to"])] + [_el(t, "Sent message") for t in texts] +
            [_field("Message", s["fields"]["Message"]), _el("Send", None, BTN, True, do=("send", None))] + _error(s))


def _compose(env, s):
    return _form_screen("New message", s, "Send", "send")


def _settings(env, s):
    return [_el("Settings")] + [_el(k, None, SW, True, do=("setting", k), checked=env.data["settings"][k])
                                for k in SETTINGS]


def _expenses(env, s):
    els = _list_screen(env, "Expenses", ("Add expense", {"name": "expense_form", "cat": None,
                                                         **_form("Name", "Amount")}))
    return els[:1] + [_el(f"Total: {sum(e['amount'] for e in env.data['expenses'])}")] + els[1:]


def _expense(env, s):
    e = by_id(env.data["expenses"], s["id"])
    return [_el(e["name"]), _el(str(e["amount"]), "Amount"), _el(e["category"], "Category"),
            _el("Delete", None, BTN, True, do=("delete", ("expenses", e["id"])))]


def _expense_form(env, s):
    f = s["fields"]
    return ([_el("New expense"), _field("Name", f["Name"]), _field("Amount", f["Amount"])] +
            [_el(c, None, RADIO, True, do=("category", c), checked=s["cat"] == c) for c in CATEGORIES] +
            [_el("Save", None, BTN, True, do=("save_expense", None))] + _error(s))


def _files(env, s):
    return _list_screen(env, "Files")


def _file(env, s):
    fl = by_id(env.data["files"], s["id"])
    return [_el(fl["name"]),
            _el("Rename", None, BTN, True, do=("push", {"name": "file_form", "id": fl["id"],
                                                        "fields": {"File name": fl["name"]}})),
            _el("Delete", None, BTN, True, do=("delete", ("files", fl["id"])))]


def _file_form(env, s):
    return _form_screen("Rename file", s, "OK", "rename")


SCREENS = {"home": _home, "contacts": _contacts, "contact": _contact, "contact_form": _contact_form,
           "clock": _clock, "alarm": _alarm, "alarm_form": _alarm_form, "notes": _notes, "note": _note,
           "note_form": _note_form, "messages": _messages, "thread": _thread, "compose": _compose,
           "settings": _settings, "expenses": _expenses, "expense": _expense, "expense_form": _expense_form,
           "files": _files, "file": _file, "file_form": _file_form}


# ----------------------------------------------------------------------------- effects of tapping: (env, arg)
# A form that does not validate stays open with an error line (a Save that fails still is a valid action).

def _open_app(env, app):
    env.stack = [{"name": "home"}, {"name": APPS[app], "page": 0}]


def _push(env, screen):
    env.stack.append(copy.deepcopy(screen))


def _delete(env, arg):
    key, i = arg
    env.data[key] = [it for it in env.data[key] if it["id"] != i]
    env.stack.pop()


def _toggle_alarm(env, i):
    a = by_id(env.data["alarms"], i)
    a["on"] = not a["on"]


def _setting(env, k):
    env.data["settings"][k] = not env.data["settings"][k]


def _category(env, c):
    env.stack[-1]["cat"] = c


def _refuse(env, message):
    env.stack[-1]["error"] = message


def _save_contact(env, _):
    s, d = env.stack[-1], env.data
    f = s["fields"]
    if not f["Name"] or not digits(f["Phone"]):
        return _refuse(env, "Name and phone number are required")
    if s["id"] is None:
        d["contacts"].append({"name": f["Name"], "phone": f["Phone"], "id": env.new_id()})
        d["contacts"].sort(key=lambda c: c["name"])
    else:
        by_id(d["contacts"], s["id"]).update(name=f["Name"], phone=f["Phone"])
    env.stack.pop()


def _save_alarm(env, _):
    h, m = env.stack[-1]["fields"]["Hour"], env.stack[-1]["fields"]["Minute"]
    if not (h.isdigit() and m.isdigit() and int(h) < 24 and int(m) < 60):
        return _refuse(env, "Enter hour 0-23 and minute 0-59")
    env.data["alarms"].append({"time": f"{int(h):02d}:{int(m):02d}", "on": True, "id": env.new_id()})
    env.data["alarms"].sort(key=lambda a: a["time"])
    env.stack.pop()


def _save_note(env, _):
    f = env.stack[-1]["fields"]
    if not f["Title"]:
        return _refuse(env, "A note needs a title")
    env.data["notes"].append({"title": f["Title"], "body": f["Text"], "id": env.new_id()})
    env.stack.pop()


def _send(env, _):
    s = env.stack[-1]
    f = s["fields"]
    to = s.get("to") or f.get("To", "")
    if to not in {c["name"] for c in env.data["contacts"]}:
        return _refuse(env, f"Unknown recipient {to!r}" if to else "Enter a recipient")
    if not f.get("Message"):
        return _refuse(env, "Message is empty")
    env.data["messages"].append({"to": to, "text": f["Message"]})
    if s["name"] == "thread":
        f["Message"] = ""
    else:
        env.stack.pop()


def _save_expense(env, _):
    s = env.stack[-1]
    f = s["fields"]
    if not f["Name"] or not f["Amount"].isdigit() or int(f["Amount"]) <= 0 or s["cat"] is None:
        return _refuse(env, "Enter a name, a whole positive amount and pick a category")
    env.data["expenses"].append({"name": f["Name"], "amount": int(f["Amount"]), "category": s["cat"],
                                 "id": env.new_id()})
    env.stack.pop()


def _rename(env, _):
    s = env.stack[-1]
    fl, new = by_id(env.data["files"], s["id"]), s["fields"]["File name"]
    if not new or any(x["name"] == new and x is not fl for x in env.data["files"]):
        return _refuse(env, "Invalid or duplicate file name")
    fl["name"] = new
    env.stack.pop()


EFFECTS = {"open": _open_app, "push": _push, "delete": _delete, "toggle_alarm": _toggle_alarm, "setting": _setting,
           "category": _category, "save_contact": _save_contact, "save_alarm": _save_alarm, "save_note": _save_note,
           "send": _send, "save_expense": _save_expense, "rename": _rename}


# ----------------------------------------------------------------------------- actions: (env, action, elements)

def _tap(env, a, els):
    e = els[a["index"]]
    if e["is_clickable"] and e["do"] and e["do"][0] != "field":
        EFFECTS[e["do"][0]](env, e["do"][1])


def _type(env, a, els):
    """As on the device: tap the field, clear it if asked, type after what it holds, press Enter (a no-op
    here). Typing nothing does nothing at all, as android_world's actuation skips an empty text."""
    e = els[a["index"]]
    if not e["is_editable"]:
        raise ValueError(f"element {a['index']} is not editable")
    if a["text"]:
        f, label = env.stack[-1]["fields"], e["do"][1]
        f[label] = a["text"] if a.get("clear_text") else f[label] + a["text"]
        env.stack[-1].pop("error", None)


def _scroll(env, a, els):
    # the list fills the screen, so scrolling any element of it (or no index: the screen) pages it
    if LISTS.get(env.stack[-1]["name"]) is not None and a["direction"] in ("up", "down"):
        down = (a["direction"] == "down") == (a["action_type"] == "scroll")  # swiping up scrolls down
        last = max(0, (len(env.page_items()[0]) - 1) // env.PAGE)
        env.stack[-1]["page"] = min(max(env.page() + (1 if down else -1), 0), last)


def _back(env, a, els):
    if len(env.stack) > 1:
        env.stack.pop()


def _go_home(env, a, els):
    env.stack = [{"name": "home"}]


def _launch(env, a, els):
    app = LAUNCHER.get(a["app_name"].lower())
    if app is None:
        raise ValueError(f"no app named {a['app_name']!r}; installed: {', '.join(APPS)}")
    _open_app(env, app)


def _answer(env, a, els):
    env.data["answer"] = a["text"]


def _status(env, a, els):
    env.done, env.gave_up = True, a["goal_status"] == "infeasible"


def _nothing(env, a, els):
    pass


ACTIONS = {"click": _tap, "double_tap": _tap, "long_press": _nothing, "input_text": _type, "scroll": _scroll,
           "swipe": _scroll, "navigate_back": _back, "navigate_home": _go_home, "open_app": _launch,
           "answer": _answer, "status": _status, "keyboard_enter": _nothing, "wait": _nothing}


# ----------------------------------------------------------------------------- the env

class TextPhone:
    """Offline STAND-IN for AndroidWorld (not the real benchmark): apps as Python data, T3A-style screens.
    task_type is the template's name."""
    name, rules = "android", RULES
    PAGE = 5  # list items per screen page; longer lists need scroll
    _STATE = ("seed", "task_type", "params", "task", "data", "stack", "steps", "max_steps", "done", "success",
              "gave_up", "obs")

    def __init__(self, templates=None, max_steps=None, compact=False, future_lines=0):
        self.templates = list(templates or ID_TEMPLATES)
        bad = [t for t in self.templates if t not in TEMPLATES]
        if bad:
            raise ValueError(f"unknown task template {bad[0]!r}; known: {sorted(TEMPLATES)}")
        self.max_steps_override, self.compact = max_steps, compact
        self.future_lines = envs.check_future_lines(future_lines)
        self.data, self.stack, self.params, self.task_type = {}, [{"name": "home"}], {}, ""
        self.task, self.obs, self.seed = "", "", None
        self.steps, self.max_steps, self.done, self.success, self.gave_up = 0, 0, False, False, False

    # ---- protocol
    def reset(self, seed):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.task_type = self.templates[int(rng.integers(len(self.templates)))]
        self.data = random_data(rng)
        gen, _, _, complexity = TEMPLATES[self.task_type]
        self.params, self.task = gen(rng, self.data)
        self.stack = [{"name": "home"}]
        self.steps, self.done, self.success, self.gave_up = 0, False, False, False
        self.max_steps = self.max_steps_override or int(complexity * 10)
        self.obs = self._render()
        return self.obs

    def step(self, action):
        if self.done:
            return envs.after_done(self)
        self.steps += 1
        note = ""
        try:
            a = parse_action(action)
            ACTIONS[a["action_type"]](self, a, self._target(a))
        except ValueError as e:
            note = f"Invalid action: {e}\n"
        if self.done:      # the agent ended it with status: only "complete" on a met goal succeeds
            self.success = not self.gave_up and self.check()
        elif self.steps >= self.max_steps:   # out of steps: a failure, as in android_world's runner
            self.done = True
        self.obs = note + self._render()
        return self.obs, float(self.success), self.done, {"success": self.success, "action_is_valid": not note}

    def _target(self, a):
        """The screen's elements, after checking the action's index (x, y become the index of that row)."""
        els = self.elements()
        if "x" in a:  # pseudo layout: element i fills the rows y in [ROW_TOP + i*ROW_H, +ROW_H)
            if not 0 <= a["x"] < 1080 or a["y"] < ROW_TOP:
                raise ValueError(f"no element at x={a['x']}, y={a['y']}")
            a["index"] = (a["y"] - ROW_TOP) // ROW_H
        if "index" in a and not 0 <= a["index"] < len(els):
            raise ValueError(f"index {a['index']} out of range (screen has {len(els)} elements, 0-{len(els) - 1})")
        return els

    def check(self):
        return bool(TEMPLATES[self.task_type][1](self.data, self.params))

    def get_state(self):
        return copy.deepcopy({k: getattr(self, k) for k in self._STATE})

    def set_state(self, state):
        for k, v in copy.deepcopy(state).items():
            setattr(self, k, v)

    def render(self):
        return self.obs

    def action_hint(self):
        return HINT

    def state_similarity(self, imagined, real):
        return state_similarity(imagined, real)

    def expert_plan(self, limit=40):
        """Roll the template's oracle policy forward on a copy; None if the goal can no longer be reached."""
        sim = TextPhone(self.templates, self.max_steps_override)
        sim.set_state(self.get_state())
        sim.done, sim.max_steps, plan = False, 10 ** 9, []
        for _ in range(limit):
            a = TEMPLATES[sim.task_type][2](sim, sim.params)
            if a is None:
                return None
            plan.append(a)
            _, _, done, info = sim.step(a)
            if not info["action_is_valid"]:
                return None
            if done:
                return plan if sim.success else None
        return None

    def valid_actions(self):
        els = self.elements()
        out = [act("click", index=i) for i, e in enumerate(els) if e["is_clickable"] and not e["is_editable"]]
        words = [v for v in self.params.values() if isinstance(v, str)] + ["test"]
        out += [act("input_text", text=w, index=i) for i, e in enumerate(els) if e["is_editable"] for w in words]
        if LISTS.get(self.stack[-1]["name"]) is not None:
            out += [act("scroll", direction="down"), act("scroll", direction="up")]
        out += [act("navigate_back"), act("navigate_home")] + [act("open_app", app_name=a) for a in APPS]
        return out + [STATUS_DONE]

    # ---- screens
    def elements(self):
        return SCREENS[self.stack[-1]["name"]](self, self.stack[-1])

    def _render(self):
        return render(enumerate(self.elements()), self.compact)

    def page(self):
        """The page of the screen's list on show (a list that shrank shows its last page)."""
        return min(self.stack[-1].get("page", 0), max(0, (len(self._items()) - 1) // self.PAGE))

    def _items(self):
        return LISTS[self.stack[-1]["name"]][0](self.data)

    def page_items(self):
        """(all items of the screen's list, the items on this page, the page number)."""
        items, p = self._items(), self.page()
        return items, items[p * self.PAGE:(p + 1) * self.PAGE], p

    def new_id(self):
        self.data["next_id"] += 1
        return self.data["next_id"] - 1


def make_env(split, templates=None, max_steps=None, compact=False, future_lines=0):
    """TextPhone for a split: ID templates for train and id (disjoint seeds), the held-out ones for ood.
    templates: narrow the split's templates to these names. max_steps: override int(10 x complexity).
    compact: short screen lines (about 5x fewer characters) for small byte-level models. future_lines: k > 0
    writes a future screen in traces as its first k changed lines (envs.future_text); 0, the whole screen."""
    envs.check_split(split)
    chosen = list(OOD_TEMPLATES if split == "ood" else ID_TEMPLATES)
    templates = [templates] if isinstance(templates, str) else templates
    if templates is not None:
        bad = sorted(set(templates) - set(TEMPLATES))
        if bad:
            raise ValueError(f"unknown task template(s) {bad}; known: {sorted(TEMPLATES)}")
        chosen = [t for t in chosen if t in templates]
        if not chosen:
            raise ValueError(f"none of {list(templates)} is a {split} template; {split} has "
                             f"{list(OOD_TEMPLATES if split == 'ood' else ID_TEMPLATES)}")
    return TextPhone(chosen, max_steps, compact, future_lines)
