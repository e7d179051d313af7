"""AndroidWorld for Dyna-Mind: the JSON action schema, T3A's screen text, and the adapter to the real benchmark.

    make_env(split)                                   -> TextPhone, the offline stand-in (textphone.py)
    make_env(split, backend="android_world", ...)     -> AndroidWorldEnv on an emulator

AndroidWorldEnv drives google-research/android_world (an AsyncEnv on an Android emulator plus a TaskEval).
android_world imports DeepMind's `android_env` package, the same name as this file, so it never runs in this
process: one worker process per emulator (multiprocessing, spawn context) drops this directory from its
sys.path before importing android_world, and the env talks to it over a multiprocessing connection.
Episodes follow android_world's runner (suite_utils / minimal_task_runner): params seeded as the suite seeds
them, initialize_task, then reset(go_home=task.start_on_home_screen); observations with wait_to_stabilize=True;
success only when the agent says status complete and is_successful is 1; int(10 x complexity) steps at most.
Branching (get_state / set_state) replays the actions from reset and ends a branch whose screens differ from
the recorded ones. Every replay costs a task re-initialisation on the emulator (app snapshots, seconds).

Observation (both envs): the elements T3A lists (visible ones), numbered by their position in the device's
list, each printed as str(UIElement) cut to the fields a text agent needs:
  UI element 3: UIElement(text='Wi-Fi', content_description=None, class_name='android.widget.Switch',
  hint_text=None, is_checked=True, is_clickable=True, is_editable=False)
"""
import atexit
import hashlib
import json
import multiprocessing
import os
import random
import re
import sys

import numpy

import envs

RULES = """You operate an Android phone (an emulator running AndroidWorld) to complete the user's goal.
Each screen is the phone's list of visible UI elements, numbered by their position in the device's list:
UI element i: UIElement(text=..., content_description=..., class_name=..., hint_text=..., is_checked=...,
is_clickable=..., is_editable=...)
Answer with one JSON action per turn (optionally after "Action:"); i must be a listed element:
{"action_type": "click", "index": i}            tap element i (also long_press, double_tap; or "x", "y" pixels)
{"action_type": "input_text", "text": "...", "index": i}   tap field i, type the text after what it holds,
    then press Enter; add "clear_text": true to replace what it holds
{"action_type": "keyboard_enter"}  {"action_type": "navigate_back"}  {"action_type": "navigate_home"}
{"action_type": "scroll", "direction": "down"}  scroll the screen (up/down/left/right), or element i with "index"
{"action_type": "swipe", "direction": "up"}     swipe across the screen (the opposite of scroll)
{"action_type": "open_app", "app_name": "Settings"}  {"action_type": "wait"}
{"action_type": "answer", "text": "..."}        reply to a question; the episode goes on
{"action_type": "status", "goal_status": "complete"}   end the episode; the goal is then checked. "infeasible"
    ends it as a failure, and so does running out of steps (10 per unit of the task's complexity).
A malformed action or an index not on the screen wastes a step and changes nothing. A device error ends the
episode."""

HINT = ('Reply with one JSON action, e.g. {"action_type": "click", "index": 3}. Types: click/long_press/'
        'double_tap (index), input_text (text, index, optional clear_text), scroll (direction), navigate_back, '
        'navigate_home, open_app (app_name), answer (text), wait, status (goal_status: complete|infeasible).')

# ----------------------------------------------------------------------------- the JSON action schema

ACTION_TYPES = ("click", "long_press", "double_tap", "input_text", "keyboard_enter", "navigate_home",
                "navigate_back", "scroll", "swipe", "open_app", "wait", "answer", "status")
ACTION_KEYS = ("action_type", "index", "x", "y", "text", "direction", "app_name", "goal_status", "clear_text")
DIRECTIONS = ("up", "down", "left", "right")
STATUS_DONE = '{"action_type": "status", "goal_status": "complete"}'


def _int(v, key):
    # JSONAction does int(index); accept ints and digit strings, never bools or floats like 1.5
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit())):
        raise ValueError(f"'{key}' must be an integer, got {v!r}")
    return int(v)


def _target(t, d):
    if "index" in d and ("x" in d or "y" in d):
        raise ValueError(f"{t} takes either 'index' or 'x','y', not both")
    if "index" in d:
        return {"index": _int(d["index"], "index")}
    if "x" in d and "y" in d:
        return {"x": _int(d["x"], "x"), "y": _int(d["y"], "y")}
    raise ValueError(f"{t} needs 'index' (or 'x' and 'y')")


def _input(t, d):
    if not isinstance(d.get("text"), str):
        raise ValueError("input_text needs a string 'text'")
    if "index" not in d:
        raise ValueError("input_text needs 'index' of an editable element")
    out = {"text": d["text"], "index": _int(d["index"], "index")}
    if "clear_text" in d:
        if not isinstance(d["clear_text"], bool):
            raise ValueError("'clear_text' must be true or false")
        out["clear_text"] = d["clear_text"]
    return out


def _direction(t, d):
    if d.get("direction") not in DIRECTIONS:
        raise ValueError(f"{t} needs 'direction' in up/down/left/right, got {d.get('direction')!r}")
    return {"direction": d["direction"], **({"index": _int(d["index"], "index")} if d.get("index") is not None
                                            else {})}


def _app(t, d):
    if not isinstance(d.get("app_name"), str) or not d["app_name"].strip():
        raise ValueError("open_app needs a non-empty 'app_name'")
    return {"app_name": d["app_name"].strip()}


def _answer(t, d):
    if not isinstance(d.get("text"), str):
        raise ValueError("answer needs a string 'text'")
    return {"text": d["text"]}


def _status(t, d):
    if d.get("goal_status") not in ("complete", "infeasible"):
        raise ValueError("status needs 'goal_status' complete or infeasible")
    return {"goal_status": d["goal_status"]}


def _nothing(t, d):
    return {}


ARGS = {"click": _target, "long_press": _target, "double_tap": _target, "input_text": _input,
        "scroll": _direction, "swipe": _direction, "open_app": _app, "answer": _answer, "status": _status,
        "keyboard_enter": _nothing, "navigate_home": _nothing, "navigate_back": _nothing, "wait": _nothing}


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
    if t not in ARGS:
        raise ValueError(f"unknown action_type {t!r}; use one of {', '.join(ACTION_TYPES)}")
    extra = [k for k in d if k not in ACTION_KEYS or (k == "clear_text" and t != "input_text")]
    if extra:
        raise ValueError(f"unexpected field {extra[0]!r} for {t}")
    return {"action_type": t, **ARGS[t](t, d)}


def act(action_type, **kw):
    return json.dumps({"action_type": action_type, **kw})


# ----------------------------------------------------------------------------- T3A's screen text

TV, BTN, EDIT, SW, IMG, RADIO = ("android.widget.TextView", "android.widget.Button", "android.widget.EditText",
                                 "android.widget.Switch", "android.widget.ImageButton", "android.widget.RadioButton")
# UIElement's own fields, in its order, that a text agent needs (T3A prints all 22, bounding boxes included)
FIELDS = ("text", "content_description", "class_name", "hint_text", "is_checked", "is_clickable", "is_editable")


def ui_line(i, el):
    """One element as T3A prints it: f'UI element {i}: {str(ui_element)}', cut to FIELDS."""
    return f"UI element {i}: UIElement(" + ", ".join(f"{k}={el.get(k)!r}" for k in FIELDS) + ")"


def compact_line(i, el):
    """The same facts in about a fifth of the characters, for small byte-level models (option compact)."""
    label = next((el[k] for k in ("text", "content_description", "hint_text") if el.get(k) is not None), None)
    hint = f" hint={el['hint_text']!r}" if el.get("hint_text") is not None and label != el["hint_text"] else ""
    flags = ((" clickable" if el.get("is_clickable") else "") + (" editable" if el.get("is_editable") else "")
             + ((" on" if el.get("is_checked") else " off") if el.get("is_checkable") else ""))
    return f"{i}: {str(el.get('class_name')).rsplit('.', 1)[-1]} {label!r}{hint}{flags}"


def render(pairs, compact=False):
    """The screen text of (index, element) pairs."""
    line = compact_line if compact else ui_line
    return "\n".join(line(i, el) for i, el in pairs)


def state_similarity(imagined, real):
    """F1 over the whitespace-normalised non-empty lines of two screens."""
    def lines(text):
        return [" ".join(l.split()) for l in str(text or "").splitlines() if l.strip()]
    return envs.f1(lines(imagined), lines(real))


# ----------------------------------------------------------------------------- the android_world worker
# Everything in this section up to AndroidWorldEnv runs in the worker process, where android_world is imported.

INSTALL_HINT = ("android_world could not be imported in the worker (it is not on PyPI). Install it from source "
                "(git clone https://github.com/google-research/android_world && pip install -e android_world), "
                "or pass android_world_path=<the checkout>; then start an emulator: "
                "emulator -avd AndroidWorldAvd -no-snapshot -grpc 8554. Offline, use the default backend "
                "(TextPhone).")
ELEMENT_FIELDS = FIELDS + ("is_checkable",)


def _clean_imports(android_world_path):
    """Let `import android_env` find DeepMind's package: the worker imported this file under that name (to
    run _serve), and this directory may be on sys.path (the script's folder, the cwd, pytest's rootdir)."""
    here = os.path.dirname(os.path.abspath(__file__))
    if getattr(sys.modules.get("android_env"), "__file__", None) == os.path.abspath(__file__):
        del sys.modules["android_env"]
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(here)]
    if android_world_path:
        sys.path.insert(0, os.path.abspath(os.path.expanduser(android_world_path)))


def _visible(el, size):
    # m3a_utils.validate_ui_element: T3A lists only visible elements whose box meets the screen
    if not el.is_visible:
        return False
    b, (w, h) = el.bbox_pixels, size
    return b is None or not (b.x_min >= b.x_max or b.x_min >= w or b.x_max <= 0 or b.y_min >= b.y_max
                             or b.y_min >= h or b.y_max <= 0)


class _Phone:
    """The worker's side: one AsyncEnv on one emulator and the current TaskEval. Replies are plain data."""

    def __init__(self, launcher_kwargs):
        import android_env as deepmind_android_env
        from android_world import registry
        from android_world.env import env_launcher, json_action
        self.JSONAction, self.task = json_action.JSONAction, None
        self.env = env_launcher.load_and_setup_env(**launcher_kwargs)
        tr = registry.TaskRegistry()
        self.registry = tr.get_registry(tr.ANDROID_WORLD_FAMILY)
        self.android_env_file = deepmind_android_env.__file__

    def setup(self):
        return {"tasks": sorted(self.registry), "android_env": self.android_env_file}

    def screen(self):
        """The visible elements as dicts of FIELDS, each with its index in the device's list."""
        state, size = self.env.get_state(wait_to_stabilize=True), self.env.logical_screen_size
        return [dict({k: getattr(e, k, None) for k in ELEMENT_FIELDS}, index=i)
                for i, e in enumerate(state.ui_elements) if _visible(e, size)]

    def start(self, name, seed):
        """suite_utils' order: tear down the last task, seed params, initialize_task, then reset(go_home)."""
        if self.task is not None and self.task.initialized:
            self.task.tear_down(self.env)
        cls = self.registry[name]
        if hasattr(cls, "set_device_time"):
            cls.set_device_time(self.env)
        random.seed(seed)  # as suite_utils._instantiate_task; numpy too: android_world's data generators
        numpy.random.seed(seed % 2 ** 32)  # draw from it (random video frames), so a replay makes the same files
        params = cls.generate_random_params()
        params["seed"] = seed
        self.task = cls(params)
        self.task.initialize_task(self.env)
        self.env.reset(go_home=self.task.start_on_home_screen)
        return {"goal": self.task.goal, "complexity": float(self.task.complexity), "screen": self.screen()}

    def act(self, action):
        self.env.execute_action(self.JSONAction(**action))
        return self.screen()

    def check(self):
        return float(self.task.is_successful(self.env))

    def close(self):
        if self.task is not None and self.task.initialized:
            self.task.tear_down(self.env)
        self.env.close()


def _serve(conn, launcher_kwargs, android_world_path):
    """The worker's loop: (method, args) in, ("ok" | "invalid" | "error", value) out, until close or EOF."""
    _clean_imports(android_world_path)
    try:
        phone = _Phone(launcher_kwargs)
    except ImportError as e:
        return conn.send(("error", f"{INSTALL_HINT} ({type(e).__name__}: {e})"))
    except Exception as e:  # no emulator on that port, adb missing, ...
        return conn.send(("error", f"could not connect to the emulator with {launcher_kwargs}: "
                                   f"{type(e).__name__}: {e}"))
    conn.send(("ok", phone.setup()))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):  # the env's process is gone
            break
        try:
            reply = ("ok", getattr(phone, method)(*args))
        except ValueError as e:  # JSONAction / actuation rejected the action: an invalid step
            reply = ("invalid", str(e))
        except Exception as e:  # adb, gRPC, a task's setup: the device cannot go on
            reply = ("error", f"{type(e).__name__}: {e}")
        conn.send(reply)
        if method == "close":
            break


# ----------------------------------------------------------------------------- the env's side of the worker

class DeviceError(RuntimeError):
    """The emulator or its worker failed: the episode cannot go on."""


class Device:
    """A handle on one worker process, i.e. one emulator. `owner` is the env whose episode the device holds."""

    def __init__(self, launcher_kwargs, android_world_path=None, timeout=300.0):
        ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold torch threads
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, launcher_kwargs, android_world_path), daemon=True,
                                name=f"android_world:{launcher_kwargs.get('console_port')}")
        self.proc.start()
        child.close()
        self.timeout, self.owner = timeout, None
        # android_world's first-time app setup (emulator_setup) installs apps: allow it an hour
        self.info = self._reply(3600 if launcher_kwargs.get("emulator_setup") else timeout)

    def alive(self):
        return self.proc.is_alive()

    def call(self, method, *args):
        """Run a _Phone method in the worker. ValueError: the device rejected the action; DeviceError: any
        failure of the device or the worker."""
        if not self.alive():
            raise DeviceError(f"the android_world worker has exited (exit code {self.proc.exitcode})")
        try:
            self.conn.send((method, args))
        except OSError as e:
            raise DeviceError(f"cannot reach the android_world worker: {e}") from None
        return self._reply(self.timeout)

    def _reply(self, timeout):
        if not self.conn.poll(timeout):
            self.close(wait=0)  # a hung adb call: its state is unknown, so start afresh at the next reset
            raise DeviceError(f"no answer from the device in {timeout:.0f} s")
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError):
            self.proc.join(5)
            raise DeviceError(f"the android_world worker died (exit code {self.proc.exitcode})") from None
        if kind == "invalid":
            raise ValueError(value)
        if kind == "error":
            raise DeviceError(value)
        return value

    def close(self, wait=30):
        if self.alive() and wait:
            try:
                self.conn.send(("close", ()))
                self.conn.poll(wait)
            except OSError:
                pass
        if self.alive():
            self.proc.kill()
        self.proc.join(5)


DEVICES = {}  # (launcher kwargs, android_world_path) -> Device: one worker per emulator in this process


def device_for(launcher_kwargs, android_world_path=None, timeout=300.0):
    """The live worker of this emulator; a new one if there is none or it died (the emulator restarted)."""
    key = (json.dumps(launcher_kwargs, sort_keys=True), android_world_path)
    if key not in DEVICES or not DEVICES[key].alive():
        DEVICES[key] = Device(launcher_kwargs, android_world_path, timeout)
    return DEVICES[key]


@atexit.register
def _close_devices():
    for d in DEVICES.values():  # tear down the last task, as the suite does after each one
        d.close(wait=10)


# ----------------------------------------------------------------------------- the adapter

def task_split(name):
    """'ood' for about a quarter of the task templates, by a hash of the class name (so adding tasks to the
    registry moves none), 'id' for the rest. train and id share templates and differ by seed, as in TextPhone."""
    return "ood" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 4 == 0 else "id"


def split_tasks(names, split, only=None):
    """The registry's task names of a split (train and id: the ID templates), narrowed to `only` if given."""
    known, only = set(names), [only] if isinstance(only, str) else only
    if only is not None:
        bad = sorted(set(only) - known)
        if bad:
            raise ValueError(f"unknown android_world task(s) {bad}; the registry has: {sorted(known)}")
        known &= set(only)
    want = "ood" if split == "ood" else "id"
    out = sorted(n for n in known if task_split(n) == want)
    if not out:
        raise ValueError(f"no android_world task of split {split!r} among {sorted(known)}; "
                         f"its tasks: {sorted(n for n in names if task_split(n) == want)}")
    return out


class AndroidWorldEnv:
    """The real benchmark behind the env protocol (see module docstring). task_type = the TaskEval's class name;
    reset(seed) runs tasks[seed % len(tasks)] with its params seeded by `seed`."""
    name, rules = "android", RULES

    def __init__(self, connect, tasks, *, max_steps=None, compact=False, future_lines=0):
        self.connect = connect  # () -> the live Device of this env's emulator
        self.device, self.tasks = connect(), list(tasks)
        self.max_steps_override, self.compact = max_steps, compact
        self.future_lines = envs.check_future_lines(future_lines)
        self.task, self.obs, self.task_type, self.seed = "", "", "", None
        self.actions, self.screens = [], []  # screens[k]: the visible elements after k steps
        self.steps, self.max_steps, self.done, self.success = 0, 0, False, False
        self.resets = 0  # task initialisations on the device so far (the cost of branching, for logs)

    # ---- protocol
    def reset(self, seed):
        return self._start(seed, self.tasks[seed % len(self.tasks)])

    def _start(self, seed, task_type):
        self.seed, self.task_type, self.actions, self.steps = seed, task_type, [], 0
        self.done = self.success = False
        self.resets += 1
        try:
            self.device = self.connect()
            self.device.owner = self
            out = self.device.call("start", task_type, seed)
        except (DeviceError, ValueError) as e:  # the suite skips such a task; here it is a failed episode
            self.task, self.max_steps, self.screens, self.done = "", 0, [[]], True
            self.obs = f"Device error while setting up {task_type}: {e}. This episode is over."
            return self.obs
        self.task = out["goal"]
        self.max_steps = self.max_steps_override or int(10 * out["complexity"])
        self.screens = [out["screen"]]
        self.obs = self._text(out["screen"])
        return self.obs

    def step(self, action):
        if self.done:
            return envs.after_done(self)
        if self.device.owner is not self:  # another env on this emulator moved it: put this episode back
            self._replay(self.get_state())
            if self.done:
                return envs.after_done(self)
        self.steps += 1
        self.actions.append(action)
        screen, note, valid = self.screens[-1], "", True
        try:
            a = parse_action(action)
            if "index" in a and a["index"] not in {el["index"] for el in screen}:
                raise ValueError(f"index {a['index']} is not an element on this screen")
            if a["action_type"] == "status":
                self.done = True
                self.success = a["goal_status"] == "complete" and self._check()
            else:  # answer too: the device keeps it for information tasks' is_successful
                screen = self.device.call("act", a)
        except ValueError as e:
            note, valid = f"Invalid action: {e}\n", False
        except DeviceError as e:
            note, valid, self.done = f"Device error: {e}. The episode ends here.\n", False, True
        if self.steps >= self.max_steps:
            self.done = True  # the benchmark awards nothing at the step cap
        self.screens.append(screen)
        self.obs = note + self._text(screen)
        return self.obs, float(self.success), self.done, {"success": self.success, "action_is_valid": valid}

    def _check(self):
        try:
            return self.device.call("check") >= 1.0
        except (DeviceError, ValueError):
            return False

    def _text(self, screen):
        return render([(el["index"], el) for el in screen], self.compact)

    def get_state(self):
        return {"seed": self.seed, "task_type": self.task_type, "actions": list(self.actions),
                "screens": list(self.screens), "obs": self.obs, "steps": self.steps, "done": self.done,
                "success": self.success}

    def set_state(self, state):
        """Replay state's actions from reset (or go on from here if this episode is a prefix of it)."""
        n = len(self.actions)
        ahead = (self.device.owner is self and (state["seed"], state["task_type"]) == (self.seed, self.task_type)
                 and state["actions"][:n] == self.actions and self.screens == state["screens"][:n + 1]
                 and (not self.done or len(state["actions"]) == n))
        self._replay(state, n if ahead else None)

    def _replay(self, state, start=None):
        if start is None:
            self._start(state["seed"], state["task_type"])
            start = 0
        for k in range(start, len(state["actions"]) + 1):
            if k > start:
                self.step(state["actions"][k - 1])
            if self.screens[k] != state["screens"][k]:
                self.done, self.success = True, False
                self.obs = (f"Replay diverged at step {k}: the device shows another screen than when this branch "
                            f"was recorded, so the branch ends here.\n{self._text(self.screens[k])}")
                return
            if self.done:
                return

    def render(self):
        return self.obs

    def expert_plan(self):
        return None  # no oracle on a real device

    def valid_actions(self):
        screen = self.screens[-1] if self.screens else []
        out = [act("click", index=el["index"]) for el in screen if el["is_clickable"]]
        out += [act("input_text", text="test", index=el["index"]) for el in screen if el["is_editable"]]
        return out + [act("scroll", direction="down"), act("scroll", direction="up"), act("navigate_back"),
                      act("navigate_home"), STATUS_DONE]

    def action_hint(self):
        return HINT

    def state_similarity(self, imagined, real):
        return state_similarity(imagined, real)

    def close(self):
        self.device.close()


# ----------------------------------------------------------------------------- make_env

TEXTPHONE_OPTIONS = ("templates", "max_steps", "compact", "future_lines")
ANDROID_WORLD_OPTIONS = ("console_port", "grpc_port", "adb_path", "emulator_setup", "freeze_datetime", "tasks",
                         "max_steps", "compact", "future_lines", "android_world_path", "timeout")


def make_env(split, backend="textphone", **options):
    """An env of `split` (train / id / ood). backend "textphone" (default): the offline stand-in, options
    templates (narrow the split's templates to these), max_steps, compact, future_lines. backend "android_world": see
    android_world_env."""
    envs.check_split(split)
    if backend == "textphone":
        envs.check_options("android (textphone)", options, TEXTPHONE_OPTIONS)
        import textphone  # the stand-in sits above this file: it renders with this file's helpers
        return textphone.make_env(split, **options)
    if backend == "android_world":
        envs.check_options("android (android_world)", options, ANDROID_WORLD_OPTIONS)
        return android_world_env(split, **options)
    raise ValueError(f"unknown android backend {backend!r}: use textphone or android_world")


def android_world_env(split, console_port=5554, grpc_port=8554, adb_path=None, emulator_setup=False,
                      freeze_datetime=True, tasks=None, max_steps=None, compact=False, future_lines=0,
                      android_world_path=None, timeout=300.0):
    """AndroidWorldEnv on the emulator at console_port / grpc_port (env_launcher.load_and_setup_env's
    arguments; adb_path defaults to android_world's). Under torchrun, rank r = $LOCAL_RANK drives its own
    emulator: console_port + 2r (emulators take console ports 5554, 5556, ...) and grpc_port + r.
    tasks: narrow the split's task templates to these class names. max_steps: override int(10 x complexity).
    future_lines: k > 0 writes a future screen in traces as its first k changed lines (envs.future_text).
    android_world_path: put first on the worker's sys.path (a source checkout; tests: the fake package).
    timeout: seconds one device call may take before the episode ends with a device error."""
    rank = int(os.environ.get("LOCAL_RANK", 0))
    launcher = dict(console_port=console_port + 2 * rank, grpc_port=grpc_port + rank,
                    emulator_setup=emulator_setup, freeze_datetime=freeze_datetime)
    if adb_path is not None:
        launcher["adb_path"] = os.path.expanduser(adb_path)

    def connect():
        return device_for(launcher, android_world_path, timeout)
    try:
        names = connect().info["tasks"]
    except DeviceError as e:
        raise (ImportError if str(e).startswith(INSTALL_HINT) else RuntimeError)(str(e)) from None
    return AndroidWorldEnv(connect, split_tasks(names, split, tasks), max_steps=max_steps, compact=compact,
                           future_lines=future_lines)
