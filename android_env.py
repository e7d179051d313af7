"""AndroidWorld for Dyna-Mind: an adapter to the real benchmark and an offline text phone.

Two environments implement the protocol of spec/INTERFACES.md:

- AndroidWorldEnv wraps google-research/android_world (an AsyncEnv on an Android emulator plus a TaskEval).
  android_world is not on PyPI and needs an emulator (AVD Pixel_6 API 33, `-grpc 8554`), so it is imported
  only when the adapter is built. Branching (get_state/set_state) replays the action prefix from reset:
  EVERY branch costs a full task re-initialisation on the emulator (app snapshots restored, seconds each).
- TextPhone is a STAND-IN, not AndroidWorld: seven small apps whose state is plain Python data, rendered as
  the same T3A-style numbered UI-element list and driven by the same JSON actions. It exists so the method
  can be trained and tested here, where no emulator runs. ID and OOD differ by task template.

Observation (both envs): one line per element, as T3A prints it, cut to the five fields the agent needs:
  UI element 3: UIElement(text='Alice Smith', content_description=None, class_name='android.widget.TextView',
  is_clickable=True, is_editable=False)
(T3A prints the whole UIElement dataclass, 21 fields with bounding boxes; we keep five to keep prompts short.)
"""
import copy
import json
import re

import numpy as np

RULES = """You operate an Android phone to complete the user's goal. Each screen is a numbered list of UI elements:
UI element i: UIElement(text=..., content_description=..., class_name=..., is_clickable=..., is_editable=...)
Answer with one JSON action per turn (optionally after "Action:"):
{"action_type": "click", "index": i}            tap element i (also long_press, double_tap; or "x", "y")
{"action_type": "input_text", "text": "...", "index": i}   replace the text of editable element i
{"action_type": "keyboard_enter"}  {"action_type": "navigate_back"}  {"action_type": "navigate_home"}
{"action_type": "scroll", "direction": "down"}  page a long list (up/down/left/right, optional "index")
{"action_type": "open_app", "app_name": "Contacts"}  {"action_type": "wait"}
{"action_type": "answer", "text": "..."}        reply to a question before finishing
{"action_type": "status", "goal_status": "complete"}   finish (or "infeasible"); the goal is then checked.
A malformed or impossible action wastes a step and leaves the screen unchanged."""

ACTION_TYPES = ("click", "long_press", "double_tap", "input_text", "keyboard_enter", "navigate_home",
                "navigate_back", "scroll", "swipe", "open_app", "wait", "answer", "status")
ACTION_KEYS = ("action_type", "index", "x", "y", "text", "direction", "app_name", "goal_status")
DIRECTIONS = ("up", "down", "left", "right")
STATUS_DONE = '{"action_type": "status", "goal_status": "complete"}'


def _int(v, key):
    # JSONAction does int(index); accept ints and digit strings, never bools or floats like 1.5
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
        raise ValueError(f"'{key}' must be an integer, got {v!r}")
    return int(v)


def parse_action(text):
    """Parse and validate one JSON action (bare, or after 'Action:'). Returns a dict; ValueError if bad."""
    if not isinstance(text, str):
        raise ValueError(f"action must be a string, got {type(text).__name__}")
    s = text.strip()
    if not s.startswith("{"):  # "Action: {...}" or T3A's "Reason: ... Action: {...}"
        m = next((m for m in re.finditer(r"action\s*:", s, re.I) if s[m.end():].lstrip().startswith("{")), None)
        s = s[m.end():].strip() if m else s
    try:
        d = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        raise ValueError(f"malformed JSON: {s[:80]!r}") from None
    if not isinstance(d, dict):
        raise ValueError("action must be a JSON object like {\"action_type\": ...}")
    t = d.get("action_type")
    if t not in ACTION_TYPES:
        raise ValueError(f"unknown action_type {t!r}; use one of {', '.join(ACTION_TYPES)}")
    extra = [k for k in d if k not in ACTION_KEYS]
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} for {t}")
    out = {"action_type": t}
    if t in ("click", "long_press", "double_tap"):
        if "index" in d and ("x" in d or "y" in d):
            raise ValueError(f"{t} takes either 'index' or 'x','y', not both")
        if "index" in d:
            out["index"] = _int(d["index"], "index")
        elif "x" in d and "y" in d:
            out["x"], out["y"] = _int(d["x"], "x"), _int(d["y"], "y")
        else:
            raise ValueError(f"{t} needs 'index' (or 'x' and 'y')")
    elif t == "input_text":
        if not isinstance(d.get("text"), str):
            raise ValueError("input_text needs a string 'text'")
        if "index" not in d:
            raise ValueError("input_text needs 'index' of an editable element")
        out["text"], out["index"] = d["text"], _int(d["index"], "index")
    elif t in ("scroll", "swipe"):
        if d.get("direction") not in DIRECTIONS:
            raise ValueError(f"{t} needs 'direction' in up/down/left/right, got {d.get('direction')!r}")
        out["direction"] = d["direction"]
        if d.get("index") is not None:
            out["index"] = _int(d["index"], "index")
    elif t == "open_app":
        if not isinstance(d.get("app_name"), str) or not d["app_name"].strip():
            raise ValueError("open_app needs a non-empty 'app_name'")
        out["app_name"] = d["app_name"].strip()
    elif t == "answer":
        if not isinstance(d.get("text"), str):
            raise ValueError("answer needs a string 'text'")
        out["text"] = d["text"]
    elif t == "status":
        if d.get("goal_status") not in ("complete", "infeasible"):
            raise ValueError("status needs 'goal_status' complete or infeasible")
        out["goal_status"] = d["goal_status"]
    return out


def act(action_type, **kw):
    return json.dumps({"action_type": action_type, **kw})


def ui_line(i, text, desc, cls, clickable, editable):
    # dataclass repr style, as str(UIElement) prints in T3A
    return (f"UI element {i}: UIElement(text={text!r}, content_description={desc!r}, class_name={cls!r}, "
            f"is_clickable={clickable!r}, is_editable={editable!r})")


def compact_line(i, text, desc, cls, clickable, editable):
    """The same facts in about a fifth of the characters, for small byte-level models (env_kwargs compact)."""
    flags = (" clickable" if clickable else "") + (" editable" if editable else "")
    return f"{i}: {cls.rsplit('.', 1)[-1]} {text if text is not None else desc!r}{flags}"


def _lines(text):
    return {" ".join(l.split()) for l in text.splitlines() if l.strip()}


def state_similarity(imagined, real):
    """F1 over the sets of non-empty UI lines (whitespace-normalised)."""
    a, b = _lines(imagined or ""), _lines(real or "")
    if not a and not b:
        return 1.0
    common = len(a & b)
    if common == 0:
        return 0.0
    p, r = common / len(a), common / len(b)
    return 2 * p * r / (p + r)


HINT = ('Reply with one JSON action, e.g. {"action_type": "click", "index": 3}. Types: click/long_press/'
        'double_tap (index), input_text (text, index), scroll (direction), navigate_back, navigate_home, '
        'open_app (app_name), answer (text), wait, status (goal_status: complete|infeasible).')


# ----------------------------------------------------------------------------- AndroidWorld adapter

INSTALL_HINT = ("android_world is not installed (it is not on PyPI). Install it from source: "
                "git clone https://github.com/google-research/android_world && pip install -e android_world, "
                "then start an emulator: emulator -avd Pixel_6_API_33 -no-snapshot -grpc 8554. "
                "Offline, use TextPhone / make_env() instead.")


def _import_json_action():
    try:
        from android_world.env import json_action
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    return json_action.JSONAction


def _visible(el, screen):
    # m3a_utils.validate_ui_element: T3A lists only visible elements with an on-screen box
    if getattr(el, "is_visible", True) is False:
        return False
    b = getattr(el, "bbox_pixels", None)
    if b is None or screen is None:
        return True
    w, h = screen
    return not (b.x_min >= b.x_max or b.x_min >= w or b.x_max <= 0 or b.y_min >= b.y_max
                or b.y_min >= h or b.y_max <= 0)


class AndroidWorldEnv:
    """The real benchmark behind the env protocol.

    aw_env: an android_world AsyncEnv (e.g. from AndroidWorldEnv.connect()).
    task_fn(seed) -> a NEW TaskEval (android_world's initialize_task may run once per instance), e.g.
        lambda s: (random.seed(s), Cls(Cls.generate_random_params()))[1]
    json_action: the JSONAction class; None imports android_world's (tests pass a fake).
    Branching replays from reset: set_state costs a task re-initialisation plus len(prefix) device actions.
    """
    name = "android"

    def __init__(self, aw_env, task_fn, *, json_action=None, max_steps=None):
        self.JSONAction = json_action if json_action is not None else _import_json_action()
        self.aw, self.task_fn, self.max_steps_override = aw_env, task_fn, max_steps
        self.task_eval, self.task, self.obs = None, "", ""
        self.seed, self.actions, self.steps, self.max_steps = None, [], 0, 0
        self.done = self.success = False
        self.resets = 0  # device task initialisations so far (branching cost, for logging)

    @classmethod
    def connect(cls, task_fn, **launcher_kw):
        """Connect to a running emulator via android_world's env_launcher (console_port, adb_path, ...)."""
        _import_json_action()
        from android_world.env import env_launcher
        return cls(env_launcher.load_and_setup_env(**launcher_kw), task_fn)

    def _elements(self):
        return list(self.aw.get_state().ui_elements)

    def _observe(self):
        els = self._elements()
        screen = getattr(self.aw, "logical_screen_size", None)
        return "\n".join(ui_line(i, e.text, e.content_description, e.class_name, e.is_clickable, e.is_editable)
                         for i, e in enumerate(els) if _visible(e, screen))

    def _check(self):
        return float(self.task_eval.is_successful(self.aw)) >= 1.0

    def reset(self, seed):
        if self.task_eval is not None and hasattr(self.task_eval, "tear_down"):
            self.task_eval.tear_down(self.aw)
        self.seed, self.actions, self.steps = seed, [], 0
        self.done = self.success = False
        self.task_eval = self.task_fn(seed)
        self.aw.reset(go_home=True)
        self.task_eval.initialize_task(self.aw)
        self.resets += 1
        self.task = self.task_eval.goal
        self.max_steps = self.max_steps_override or max(1, int(self.task_eval.complexity * 10))
        self.obs = self._observe()
        return self.obs

    def step(self, action):
        if self.done:
            return self.obs, 0.0, True, {"success": self.success, "action_is_valid": False,
                                         "error": "episode is over"}
        self.actions.append(action)
        self.steps += 1
        err = None
        try:
            d = parse_action(action)
            n = len(self._elements())
            if "index" in d and not 0 <= d["index"] < n:
                raise ValueError(f"index {d['index']} out of range (screen has {n} elements)")
            if d["action_type"] == "status":
                self.done = True
            else:
                self.aw.execute_action(self.JSONAction(**d))
        except Exception as e:  # a device hiccup or a bad action is an invalid step, never a crash
            err = str(e)
        if self.done or self.steps >= self.max_steps:
            self.done, self.success = True, self._check()
        screen = self._observe()
        self.obs = screen if err is None else f"Invalid action: {err}\n{screen}"
        info = {"success": self.success, "action_is_valid": err is None, "error": err}
        return self.obs, (1.0 if self.success else 0.0), self.done, info

    def get_state(self):
        return {"seed": self.seed, "actions": list(self.actions), "obs": self.obs}

    def set_state(self, state):
        # replay from reset: the emulator cannot snapshot cheaply, so each branch re-initialises the task
        self.reset(state["seed"])
        for a in state["actions"]:
            self.step(a)

    def render(self):
        return self.obs

    def expert_plan(self):
        return None  # no oracle on a real device

    def valid_actions(self):
        screen = getattr(self.aw, "logical_screen_size", None)
        els = self._elements()
        out = [act("click", index=i) for i, e in enumerate(els) if e.is_clickable and _visible(e, screen)]
        out += [act("input_text", text="test", index=i) for i, e in enumerate(els)
                if e.is_editable and _visible(e, screen)]
        return out + [act("scroll", direction="down"), act("scroll", direction="up"), act("navigate_back"),
                      act("navigate_home"), STATUS_DONE]

    def action_hint(self):
        return HINT

    def state_similarity(self, imagined, real):
        return state_similarity(imagined, real)


# ----------------------------------------------------------------------------- the offline text phone

PAGE = 5                      # list items per screen page; longer lists need scroll
ROW_TOP, ROW_H = 200, 100     # pseudo layout so clicks by x,y map to an element row
APPS = ("Contacts", "Clock", "Notes", "Messages", "Settings", "Expenses", "Files")
TV, BTN, EDIT, SW, IMG = ("android.widget.TextView", "android.widget.Button", "android.widget.EditText",
                          "android.widget.Switch", "android.widget.ImageButton")
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


def _el(text, desc=None, cls=TV, click=False, edit=False, do=None):
    return dict(text=text, desc=desc, cls=cls, click=click, edit=edit, do=do)


def _field(label, value):
    return _el(value or None, label, EDIT, True, True, ("field", label))


def _phone(rng):
    return f"555-{int(rng.integers(1000, 10000))}"


def _digits(s):
    return re.sub(r"\D", "", s or "")


def _random_data(rng):
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


def _by_id(items, i):
    return next((it for it in items if it["id"] == i), None)


class TextPhone:
    """Offline STAND-IN for AndroidWorld (not the real benchmark): apps as Python data, T3A-style screens."""
    name = "android"

    def __init__(self, templates=None, max_steps=None, compact=False):
        self.templates = list(templates or ID_TEMPLATES)
        self.line = compact_line if compact else ui_line
        bad = [t for t in self.templates if t not in TEMPLATES]
        if bad:
            raise ValueError(f"unknown task template {bad[0]!r}; known: {sorted(TEMPLATES)}")
        self.max_steps_override = max_steps
        self.data, self.stack, self.params, self.template = {}, [{"name": "home"}], {}, None
        self.task, self.obs, self.seed = "", "", None
        self.steps, self.max_steps, self.done, self.success = 0, 0, False, False

    # ---- protocol
    def reset(self, seed):
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.template = self.templates[int(rng.integers(len(self.templates)))]
        self.data = _random_data(rng)
        gen, _, _, complexity = TEMPLATES[self.template]
        self.params, self.task = gen(rng, self.data)
        self.stack = [{"name": "home"}]
        self.steps, self.done, self.success = 0, False, False
        self.max_steps = self.max_steps_override or int(complexity * 10)
        self.obs = self._render()
        return self.obs

    def step(self, action):
        if self.done:
            return self.obs, 0.0, True, {"success": self.success, "action_is_valid": False,
                                         "error": "episode is over", "template": self.template}
        self.steps += 1
        err = None
        try:
            self._apply(parse_action(action))
        except ValueError as e:
            err = str(e)
        if self.done or self.steps >= self.max_steps:
            self.done, self.success = True, self.check()
        self.obs = self._render() if err is None else f"Invalid action: {err}\n{self._render()}"
        info = {"success": self.success, "action_is_valid": err is None, "error": err, "template": self.template}
        return self.obs, (1.0 if self.success else 0.0), self.done, info

    def check(self):
        return bool(TEMPLATES[self.template][1](self.data, self.params))

    _STATE = ("seed", "template", "params", "task", "data", "stack", "steps", "max_steps", "done", "success",
              "obs")

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
            a = TEMPLATES[sim.template][2](sim, sim.params)
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
        out = [act("click", index=i) for i, e in enumerate(els) if e["click"] and not e["edit"]]
        words = [v for v in self.params.values() if isinstance(v, str)] + ["test"]
        out += [act("input_text", text=w, index=i) for i, e in enumerate(els) if e["edit"] for w in words]
        if self._list() is not None:
            out += [act("scroll", direction="down"), act("scroll", direction="up")]
        out += [act("navigate_back"), act("navigate_home")] + [act("open_app", app_name=a) for a in APPS]
        return out + [STATUS_DONE]

    # ---- screens
    def _render(self):
        return "\n".join(self.line(i, e["text"], e["desc"], e["cls"], e["click"], e["edit"])
                         for i, e in enumerate(self.elements()))

    def _list(self):
        """(items, label_fn, open_fn) of the scrollable list on this screen, or None."""
        d, name = self.data, self.stack[-1]["name"]
        if name == "contacts":
            return d["contacts"], lambda c: (c["name"], None), lambda c: {"name": "contact", "id": c["id"]}
        if name == "clock":
            return d["alarms"], None, lambda a: {"name": "alarm", "id": a["id"]}
        if name == "notes":
            return d["notes"], lambda n: (n["title"], None), lambda n: {"name": "note", "id": n["id"]}
        if name == "messages":
            return (self._threads(), lambda t: (t["to"], t["text"]),
                    lambda t: {"name": "thread", "to": t["to"], "fields": {"Message": ""}})
        if name == "expenses":
            return (d["expenses"], lambda e: (e["name"], f"{e['amount']} · {e['category']}"),
                    lambda e: {"name": "expense", "id": e["id"]})
        if name == "files":
            return d["files"], lambda f: (f["name"], None), lambda f: {"name": "file", "id": f["id"]}
        return None

    def _threads(self):
        last = {}
        for m in self.data["messages"]:  # latest message per contact, most recent thread first
            last.pop(m["to"], None)
            last[m["to"]] = m
        return list(reversed(list(last.values())))

    def page(self):
        items = self._list()[0]
        top = max(0, (len(items) - 1) // PAGE)
        return min(self.stack[-1].get("page", 0), top)

    def _page_items(self):
        items = self._list()[0]
        p = self.page()
        return items, items[p * PAGE:(p + 1) * PAGE], p

    def _list_els(self, title, add=None):
        items, shown, p = self._page_items()
        _, label, opener = self._list()
        els = [_el(title)]
        for it in shown:
            if label is None:  # alarm row: time plus its on/off switch
                els += [_el(it["time"], None, TV, True, do=("push", opener(it))),
                        _el("On" if it["on"] else "Off", f"{it['time']} alarm", SW, True,
                            do=("toggle_alarm", it["id"]))]
            else:
                t, desc = label(it)
                els.append(_el(t, desc, TV, True, do=("push", opener(it))))
        if not items:
            els.append(_el("Nothing here yet"))
        elif len(items) > PAGE:
            els.append(_el(f"Showing {p * PAGE + 1}-{p * PAGE + len(shown)} of {len(items)}"))
        if add:
            els.append(_el(None, add[0], IMG, True, do=("push", add[1])))
        return els

    def elements(self):
        d, s = self.data, self.stack[-1]
        n, f = s["name"], s.get("fields", {})
        err = [_el(s["error"])] if s.get("error") else []
        if n == "home":
            return [_el("Home")] + [_el(a, None, TV, True, do=("open", a)) for a in APPS]
        if n == "contacts":
            return self._list_els("Contacts", ("Add contact", {"name": "contact_form", "id": None,
                                                               "fields": {"Name": "", "Phone": ""}}))
        if n == "contact":
            c = _by_id(d["contacts"], s["id"])
            return [_el(c["name"]), _el(c["phone"], "Phone"),
                    _el("Edit", None, BTN, True, do=("push", {"name": "contact_form", "id": c["id"], "fields": {
                        "Name": c["name"], "Phone": c["phone"]}})),
                    _el("Message", None, BTN, True, do=("push", {"name": "compose", "fields": {
                        "To": c["name"], "Message": ""}})),
                    _el("Delete", None, BTN, True, do=("delete", ("contacts", c["id"])))]
        if n == "contact_form":
            return [_el("New contact" if s["id"] is None else "Edit contact"), _field("Name", f["Name"]),
                    _field("Phone", f["Phone"]), _el("Save", None, BTN, True, do=("save_contact", None))] + err
        if n == "clock":
            return self._list_els("Alarms", ("Add alarm", {"name": "alarm_form",
                                                           "fields": {"Hour": "", "Minute": ""}}))
        if n == "alarm":
            a = _by_id(d["alarms"], s["id"])
            return [_el(a["time"]), _el("On" if a["on"] else "Off", f"{a['time']} alarm", SW, True,
                                        do=("toggle_alarm", a["id"])),
                    _el("Delete", None, BTN, True, do=("delete", ("alarms", a["id"])))]
        if n == "alarm_form":
            return [_el("New alarm"), _field("Hour", f["Hour"]), _field("Minute", f["Minute"]),
                    _el("Save", None, BTN, True, do=("save_alarm", None))] + err
        if n == "notes":
            return self._list_els("Notes", ("New note", {"name": "note_form", "fields": {"Title": "", "Text": ""}}))
        if n == "note":
            nt = _by_id(d["notes"], s["id"])
            return [_el(nt["title"]), _el(nt["body"], "Text"),
                    _el("Delete", None, BTN, True, do=("delete", ("notes", nt["id"])))]
        if n == "note_form":
            return [_el("New note"), _field("Title", f["Title"]), _field("Text", f["Text"]),
                    _el("Save", None, BTN, True, do=("save_note", None))] + err
        if n == "messages":
            return self._list_els("Messages", ("New message", {"name": "compose",
                                                               "fields": {"To": "", "Message": ""}}))
        if n == "thread":
            texts = [m["text"] for m in d["messages"] if m["to"] == s["to"]][-PAGE:]
            return ([_el(s["to"])] + [_el(t, "Sent message") for t in texts] +
                    [_field("Message", f["Message"]), _el("Send", None, BTN, True, do=("send", None))] + err)
        if n == "compose":
            return [_el("New message"), _field("To", f["To"]), _field("Message", f["Message"]),
                    _el("Send", None, BTN, True, do=("send", None))] + err
        if n == "settings":
            return [_el("Settings")] + [_el(k, "on" if d["settings"][k] else "off", SW, True, do=("setting", k))
                                        for k in SETTINGS]
        if n == "expenses":
            els = self._list_els("Expenses", ("Add expense", {"name": "expense_form", "cat": None,
                                                              "fields": {"Name": "", "Amount": ""}}))
            return els[:1] + [_el(f"Total: {sum(e['amount'] for e in d['expenses'])}")] + els[1:]
        if n == "expense":
            e = _by_id(d["expenses"], s["id"])
            return [_el(e["name"]), _el(str(e["amount"]), "Amount"), _el(e["category"], "Category"),
                    _el("Delete", None, BTN, True, do=("delete", ("expenses", e["id"])))]
        if n == "expense_form":
            return ([_el("New expense"), _field("Name", f["Name"]), _field("Amount", f["Amount"])] +
                    [_el(c, "selected" if s["cat"] == c else None, BTN, True, do=("category", c)) for c in CATEGORIES]
                    + [_el("Save", None, BTN, True, do=("save_expense", None))] + err)
        if n == "files":
            return self._list_els("Files")
        if n == "file":
            fl = _by_id(d["files"], s["id"])
            return [_el(fl["name"]),
                    _el("Rename", None, BTN, True, do=("push", {"name": "file_form", "id": fl["id"],
                                                                "fields": {"File name": fl["name"]}})),
                    _el("Delete", None, BTN, True, do=("delete", ("files", fl["id"])))]
        if n == "file_form":
            return [_el("Rename file"), _field("File name", f["File name"]),
                    _el("OK", None, BTN, True, do=("rename", None))] + err
        raise AssertionError(f"no screen {n!r}")

    # ---- actions
    def _apply(self, a):
        t, els = a["action_type"], self.elements()
        if "x" in a:  # pseudo layout: element i fills the row y in [ROW_TOP + i*ROW_H, +ROW_H)
            if not 0 <= a["x"] < 1080 or a["y"] < ROW_TOP:
                raise ValueError(f"no element at x={a['x']}, y={a['y']}")
            a["index"] = (a["y"] - ROW_TOP) // ROW_H
        if "index" in a and not 0 <= a["index"] < len(els):
            raise ValueError(f"index {a['index']} out of range (screen has {len(els)} elements, 0-{len(els) - 1})")
        if t in ("click", "double_tap"):
            e = els[a["index"]]
            if e["click"] and e["do"] and e["do"][0] != "field":
                self._do(*e["do"])
        elif t == "input_text":
            e = els[a["index"]]
            if not e["edit"]:
                raise ValueError(f"element {a['index']} is not editable")
            self.stack[-1]["fields"][e["do"][1]] = a["text"].strip()
            self.stack[-1].pop("error", None)
        elif t in ("scroll", "swipe"):
            if self._list() is not None and a["direction"] in ("up", "down"):
                down = (a["direction"] == "down") == (t == "scroll")  # swiping up scrolls down
                items = self._list()[0]
                last = max(0, (len(items) - 1) // PAGE)
                self.stack[-1]["page"] = min(max(self.page() + (1 if down else -1), 0), last)
        elif t == "navigate_back":
            if len(self.stack) > 1:
                self.stack.pop()
        elif t == "navigate_home":
            self.stack = [{"name": "home"}]
        elif t == "open_app":
            app = next((x for x in APPS if x.lower() == a["app_name"].lower()), None)
            if app is None:
                raise ValueError(f"no app named {a['app_name']!r}; installed: {', '.join(APPS)}")
            self._do("open", app)
        elif t == "answer":
            self.data["answer"] = a["text"]
        elif t == "status":
            self.done = True
        # long_press, keyboard_enter, wait: valid, nothing changes on this phone

    def _do(self, kind, arg):
        d, s = self.data, self.stack[-1]
        f = s.get("fields", {})
        if kind == "open":
            self.stack = [{"name": "home"}, {"name": arg.lower(), "page": 0}]
        elif kind == "push":
            self.stack.append(copy.deepcopy(arg))
        elif kind == "delete":
            key, i = arg
            d[key] = [it for it in d[key] if it["id"] != i]
            self.stack.pop()
        elif kind == "toggle_alarm":
            a = _by_id(d["alarms"], arg)
            a["on"] = not a["on"]
        elif kind == "setting":
            d["settings"][arg] = not d["settings"][arg]
        elif kind == "category":
            s["cat"] = arg
        elif kind == "save_contact":
            if not f["Name"] or not _digits(f["Phone"]):
                s["error"] = "Name and phone number are required"
                return
            if s["id"] is None:
                d["contacts"].append({"name": f["Name"], "phone": f["Phone"], "id": self._new_id()})
                d["contacts"].sort(key=lambda c: c["name"])
            else:
                _by_id(d["contacts"], s["id"]).update(name=f["Name"], phone=f["Phone"])
            self.stack.pop()
        elif kind == "save_alarm":
            h, m = f["Hour"], f["Minute"]
            if not (h.isdigit() and m.isdigit() and int(h) < 24 and int(m) < 60):
                s["error"] = "Enter hour 0-23 and minute 0-59"
                return
            d["alarms"].append({"time": f"{int(h):02d}:{int(m):02d}", "on": True, "id": self._new_id()})
            d["alarms"].sort(key=lambda a: a["time"])
            self.stack.pop()
        elif kind == "save_note":
            if not f["Title"]:
                s["error"] = "A note needs a title"
                return
            d["notes"].append({"title": f["Title"], "body": f["Text"], "id": self._new_id()})
            self.stack.pop()
        elif kind == "send":
            to = s.get("to") or f.get("To", "")
            if to not in {c["name"] for c in d["contacts"]}:
                s["error"] = f"Unknown recipient {to!r}" if to else "Enter a recipient"
                return
            if not f.get("Message"):
                s["error"] = "Message is empty"
                return
            d["messages"].append({"to": to, "text": f["Message"]})
            if s["name"] == "thread":
                f["Message"] = ""
            else:
                self.stack.pop()
        elif kind == "save_expense":
            if not f["Name"] or not f["Amount"].isdigit() or int(f["Amount"]) <= 0 or s["cat"] is None:
                s["error"] = "Enter a name, a whole positive amount and pick a category"
                return
            d["expenses"].append({"name": f["Name"], "amount": int(f["Amount"]), "category": s["cat"],
                                  "id": self._new_id()})
            self.stack.pop()
        elif kind == "rename":
            fl = _by_id(d["files"], s["id"])
            new = f["File name"]
            if not new or any(x["name"] == new and x is not fl for x in d["files"]):
                s["error"] = "Invalid or duplicate file name"
                return
            fl["name"] = new
            self.stack.pop()

    def _new_id(self):
        self.data["next_id"] += 1
        return self.data["next_id"] - 1


# ----------------------------------------------------------------------------- oracle helpers

def _find(env, **want):
    """Index of the first element whose fields match want (text/desc/cls/edit...)."""
    for i, e in enumerate(env.elements()):
        if all(e[k] == v for k, v in want.items()):
            return i
    return None


def _click(env, **want):
    i = _find(env, **want)
    return None if i is None else act("click", index=i)


def _fill(env, wanted, submit):
    """Type each wrong field of the form on top, then press submit."""
    f = env.stack[-1]["fields"]
    for label, value in wanted.items():
        if f.get(label) != value:
            return act("input_text", text=value, index=_find(env, desc=label, edit=True))
    return _click(env, text=submit, cls=BTN)


def _seek(env, item, click=None):
    """Scroll the current list until item is on the page, then click it (or click(env, item))."""
    items, _, p = env._page_items()
    k = next((j for j, it in enumerate(items) if it is item or it == item), None)
    if k is None:
        return None
    if k // PAGE != p:
        return act("scroll", direction="down" if k // PAGE > p else "up")
    if click:
        return click(env, item)
    for i, e in enumerate(env.elements()):
        if e["do"] and e["do"][0] == "push" and e["do"][1].get("id", e["do"][1].get("to")) == item.get(
                "id", item.get("to")):
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
        return _click(env, desc="Add contact")
    return _open("Contacts")


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
        if not all(_by_id(d[key], i) for i in p["keep"]):
            return None  # something else was deleted: no way back
        s, target = _top(env), _by_id(d[key], p["target_id"])
        if s["name"] == item_screen and s["id"] == target["id"]:
            return _click(env, text="Delete")
        if s["name"] == list_screen:
            return _seek(env, target)
        return _open(app)
    return pol


# set_alarm
def gen_set_alarm(rng, d):
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
        return _seek(env, off, lambda e, a: _click(e, desc=f"{a['time']} alarm"))
    if s["name"] == "alarm_form":
        h, m = p["time"].split(":")
        return _fill(env, {"Hour": h, "Minute": m}, "Save")
    if s["name"] == "clock":
        return _click(env, desc="Add alarm")
    return _open("Clock")


# disable_alarm (OOD)
def gen_disable_alarm(rng, d):
    a = _pick(rng, d["alarms"])
    a["on"] = True
    return {"time": a["time"], "id": a["id"]}, f"Turn off the {a['time']} alarm (do not delete it)."


def check_disable_alarm(d, p):
    a = _by_id(d["alarms"], p["id"])
    return a is not None and not a["on"]


def pol_disable_alarm(env, p):
    a = _by_id(env.data["alarms"], p["id"])
    if a is None:
        return None
    if not a["on"]:
        return STATUS_DONE
    s = _top(env)
    if s["name"] == "alarm" and s["id"] == a["id"]:
        return _click(env, desc=f"{a['time']} alarm")
    if s["name"] == "clock":
        return _seek(env, a, lambda e, x: _click(e, desc=f"{x['time']} alarm"))
    return _open("Clock")


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
        return _click(env, desc="New message")
    return _open("Messages")


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
        return _open("Messages")
    if s["name"] == "contacts":
        return _seek(env, src)
    return _open("Contacts")


# toggle_setting
def gen_toggle(rng, d):
    k, on = _pick(rng, ("Wi-Fi", "Bluetooth", "Airplane mode", "Dark theme")), bool(rng.random() < 0.5)
    d["settings"][k] = not on
    return {"setting": k, "on": on}, f"Turn {k} {'on' if on else 'off'}."


def check_toggle(d, p):
    return d["settings"][p["setting"]] == p["on"]


def pol_toggle(env, p):
    if check_toggle(env.data, p):
        return STATUS_DONE
    if _top(env)["name"] == "settings":
        return _click(env, text=p["setting"], cls=SW)
    return _open("Settings")


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
            return _click(env, text=p["category"], cls=BTN)
        return _fill(env, {"Name": p["item"], "Amount": p["amount"]}, "Save")
    if s["name"] == "expenses":
        return _click(env, desc="Add expense")
    return _open("Expenses")


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
    if not all(_by_id(d["expenses"], i) for i in p["keep"]):
        return None
    s = _top(env)
    if s["name"] == "expense" and _by_id(d["expenses"], s["id"])["category"] == p["category"]:
        return _click(env, text="Delete")
    if s["name"] == "expenses":
        return _seek(env, next(e for e in d["expenses"] if e["category"] == p["category"]))
    return _open("Expenses")


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
        return _click(env, desc="New note")
    return _open("Notes")


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
    f = _by_id(env.data["files"], p["id"])
    if f is None or len(env.data["files"]) != p["n"]:
        return None
    s = _top(env)
    if s["name"] == "file_form" and s["id"] == f["id"]:
        return _fill(env, {"File name": p["new"]}, "OK")
    if s["name"] == "file" and s["id"] == f["id"]:
        return _click(env, text="Rename")
    if s["name"] == "files":
        return _seek(env, f)
    return _open("Files")


# update_contact_phone (OOD: the edit form)
def gen_update_phone(rng, d):
    c = _pick(rng, d["contacts"])
    new = _phone(rng)
    while new == c["phone"]:
        new = _phone(rng)
    return {"name": c["name"], "id": c["id"], "phone": new}, f"Change {c['name']}'s phone number to {new}."


def check_update_phone(d, p):
    c = _by_id(d["contacts"], p["id"])
    return c is not None and c["name"] == p["name"] and c["phone"] == p["phone"]


def pol_update_phone(env, p):
    if check_update_phone(env.data, p):
        return STATUS_DONE
    c = _by_id(env.data["contacts"], p["id"])
    if c is None:
        return None
    s = _top(env)
    if s["name"] == "contact_form" and s["id"] == c["id"]:
        return _fill(env, {"Name": p["name"], "Phone": p["phone"]}, "Save")
    if s["name"] == "contact" and s["id"] == c["id"]:
        return _click(env, text="Edit")
    if s["name"] == "contacts":
        return _seek(env, c)
    return _open("Contacts")


# answer_phone (a question: look it up, answer, finish)
def gen_answer_phone(rng, d):
    c = _pick(rng, d["contacts"])
    return {"name": c["name"], "phone": c["phone"]}, f"What is {c['name']}'s phone number? Answer with the number."


def check_answer_phone(d, p):
    return d["answer"] is not None and _digits(d["answer"]) == _digits(p["phone"])


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
    return _open("Contacts")


TEMPLATES = {  # name: (gen, check, oracle policy, complexity)
    "add_contact": (gen_add_contact, check_add_contact, pol_add_contact, 1.0),
    "delete_contact": (_gen_delete("contacts", "name", "Delete the contact {}."), _check_delete("contacts"),
                       _pol_delete("contacts", "Contacts", "contacts", "contact"), 1.0),
    "set_alarm": (gen_set_alarm, check_set_alarm, pol_set_alarm, 1.0),
    "create_note": (gen_create_note, check_create_note, pol_create_note, 1.0),
    "delete_note": (_gen_delete("notes", "title", "Delete the note titled \"{}\"."), _check_delete("notes"),
                    _pol_delete("notes", "Notes", "notes", "note"), 1.0),
    "send_message": (gen_send_message, check_send_message, pol_send_message, 1.0),
    "toggle_setting": (gen_toggle, check_toggle, pol_toggle, 0.5),
    "add_expense": (gen_add_expense, check_add_expense, pol_add_expense, 1.0),
    "rename_file": (gen_rename_file, check_rename_file, pol_rename_file, 1.0),
    "answer_phone": (gen_answer_phone, check_answer_phone, pol_answer_phone, 1.0),
    # held out (OOD): new screens/interactions or two apps in one task
    "update_contact_phone": (gen_update_phone, check_update_phone, pol_update_phone, 1.0),
    "share_contact_number": (gen_share_number, check_share_number, pol_share_number, 1.5),
    "disable_alarm": (gen_disable_alarm, check_disable_alarm, pol_disable_alarm, 0.5),
    "delete_expenses_category": (gen_delete_category, check_delete_category, pol_delete_category, 2.0),
}
OOD_TEMPLATES = ("update_contact_phone", "share_contact_number", "disable_alarm", "delete_expenses_category")
ID_TEMPLATES = tuple(t for t in TEMPLATES if t not in OOD_TEMPLATES)

# disjoint seed ranges; train and id share templates, ood uses the held-out ones
SEED_BASE = {"train": 0, "id": 1_000_000, "ood": 2_000_000}


def split_seeds(split, n, start=0):
    if split not in SEED_BASE:
        raise ValueError(f"unknown split {split!r}; use train, id or ood")
    if n < 0 or start < 0 or start + n > 1_000_000:
        raise ValueError(f"seeds must lie in [0, 1000000) per split, got start={start}, n={n}")
    return list(range(SEED_BASE[split] + start, SEED_BASE[split] + start + n))


def make_env(split="train", **overrides):
    """TextPhone (the offline stand-in) for a split; overrides: templates, max_steps, compact."""
    if split not in SEED_BASE:
        raise ValueError(f"unknown split {split!r}; use train, id or ood")
    overrides.setdefault("templates", OOD_TEMPLATES if split == "ood" else ID_TEMPLATES)
    return TextPhone(**overrides)
