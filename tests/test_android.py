"""Tests for android_env: the JSON action schema, T3A's screen text, and the AndroidWorld adapter, run end to end
in its worker process against a fake android_world (tests/fixtures/android_world) that imports DeepMind's
android_env package (pip install android-env, as CI does) exactly as the real modules do."""
import importlib
import json
import os
import pickle
import sys

import pytest

import android_env as A
import envs

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module", autouse=True)
def device_log(tmp_path_factory):
    """The fake device appends every call to this file; workers inherit the variable when they start."""
    path = tmp_path_factory.mktemp("android_world") / "device.jsonl"
    _close_devices()  # workers started before now would not log
    mp = pytest.MonkeyPatch()
    mp.setenv("FAKE_ANDROID_WORLD_LOG", str(path))
    yield path
    mp.undo()
    _close_devices()


def _close_devices():
    for d in A.DEVICES.values():
        d.close(wait=5)
    A.DEVICES.clear()


def _events(log, since=0):
    lines = log.read_text().splitlines() if log.exists() else []
    return [json.loads(l) for l in lines[since:]]


def _mark(log):
    return len(log.read_text().splitlines()) if log.exists() else 0


def aw(split="id", **options):
    return A.make_env(split, backend="android_world", android_world_path=FIXTURES, **options)


def _index(env, **want):
    """The device index of the first listed element whose fields match."""
    return next(el["index"] for el in env.screens[-1] if all(el.get(k) == v for k, v in want.items()))


def _ok(env, *actions):
    for a in actions:
        obs, _, _, info = env.step(a)
        assert info["action_is_valid"], (a, obs)
    return obs


# ----------------------------------------------------------------------------- schema and screen text

def test_parse_action_forms():
    assert A.parse_action('Reason: r. Action: {"action_type": "click", "index": "3"}') == {
        "action_type": "click", "index": 3}
    assert A.parse_action(A.act("click", x=5, y=7)) == {"action_type": "click", "x": 5, "y": 7}
    assert A.parse_action(A.act("input_text", text="a", index=2, clear_text=True)) == {
        "action_type": "input_text", "text": "a", "index": 2, "clear_text": True}
    assert A.parse_action(A.act("scroll", direction="up")) == {"action_type": "scroll", "direction": "up"}
    assert A.parse_action(A.act("scroll", direction="up", index=4))["index"] == 4
    for bad in ("", "{", '{"action_type": "fly"}', '{"action_type": "click"}', '{"action_type": "click", "index": 1.5}',
                '{"action_type": "click", "index": 1, "x": 1, "y": 2}', '{"action_type": "input_text", "text": "a"}',
                '{"action_type": "input_text", "text": "a", "index": 1, "clear_text": "yes"}',
                '{"action_type": "wait", "clear_text": true}', '{"action_type": "status", "goal_status": "done"}'):
        with pytest.raises(ValueError):
            A.parse_action(bad)


def test_screen_lines_carry_t3as_fields():
    el = {"text": "Wi-Fi", "content_description": None, "class_name": A.SW, "hint_text": None, "is_checked": True,
          "is_checkable": True, "is_clickable": True, "is_editable": False}
    assert A.ui_line(3, el) == ("UI element 3: UIElement(text='Wi-Fi', content_description=None, "
                                "class_name='android.widget.Switch', hint_text=None, is_checked=True, "
                                "is_clickable=True, is_editable=False)")
    assert A.compact_line(3, el) == "3: Switch 'Wi-Fi' clickable on"
    field = dict(el, text="Hi", class_name=A.EDIT, hint_text="Title", is_checked=False, is_checkable=False,
                 is_editable=True)
    assert A.compact_line(1, field) == "1: EditText 'Hi' hint='Title' clickable editable"
    assert A.state_similarity("a\n b \n", "a\nb") == 1.0 and A.state_similarity("a\nc", "a\nb") == 0.5


# ----------------------------------------------------------------------------- the name collision

def test_in_process_import_of_android_world_collides_with_this_module(monkeypatch):
    """Why the worker exists, and proof that the fake imports `android_env` as the real android_world does:
    in this process `android_env` is this project's module, so android_world's imports fail."""
    monkeypatch.syspath_prepend(FIXTURES)
    try:
        with pytest.raises(ImportError, match="android_env"):
            importlib.import_module("android_world.env.env_launcher")
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] == "android_world"]:
            del sys.modules[m]


def test_episode_end_to_end_in_a_worker_with_deepmind_android_env():
    env = aw("ood", tasks=["SystemWifiTurnOn"])
    where = env.device.info["android_env"]
    assert where != A.__file__ and os.path.basename(os.path.dirname(where)) == "android_env"  # DeepMind's package
    assert sys.modules["android_env"] is A  # while this process keeps this project's module
    obs = env.reset(envs.split_seeds("ood", 1)[0])
    assert (env.name, env.task, env.task_type, env.max_steps, env.steps) == (
        "android", "Turn wifi on.", "SystemWifiTurnOn", 10, 0)
    assert isinstance(env.rules, str) and env.rules == A.RULES and "clear_text" in env.rules
    # T3A lists visible elements only, numbered by their place in the device's list (1 is hidden)
    assert [l.split(":")[0] for l in obs.splitlines()] == ["UI element 0", "UI element 2", "UI element 3",
                                                            "UI element 4"]
    assert obs.splitlines()[1] == ("UI element 2: UIElement(text='Settings', content_description=None, "
                                   "class_name='android.widget.TextView', hint_text=None, is_checked=False, "
                                   "is_clickable=True, is_editable=False)")
    _ok(env, A.act("open_app", app_name="Settings"))
    wifi = _index(env, text="Wi-Fi")
    assert "is_checked=False" in next(l for l in env.obs.splitlines() if "'Wi-Fi'" in l)
    obs = _ok(env, A.act("click", index=wifi))
    assert "is_checked=True" in next(l for l in obs.splitlines() if "'Wi-Fi'" in l)
    obs, r, done, info = env.step(A.STATUS_DONE)
    assert done and r == 1.0 and info == {"success": True, "action_is_valid": True} and env.steps == 3
    state = env.get_state()
    assert env.step(A.act("navigate_home")) == envs.after_done(env) and env.get_state() == state


# ----------------------------------------------------------------------------- android_world's episode rules

def test_initialize_then_reset_go_home_then_stable_observations(device_log):
    env = aw("id", tasks=["MarkorCreateNote"])
    mark = _mark(device_log)
    seed = envs.split_seeds("id", 1, start=3)[0]
    obs = env.reset(seed)
    ev = [e for e in _events(device_log, mark) if e["event"] in ("initialize_task", "reset", "get_state")]
    assert [e["event"] for e in ev] == ["initialize_task", "reset", "get_state"]
    assert ev[0]["params"]["seed"] == seed and ev[1]["go_home"] is True
    assert "text='Home'" in obs  # initialize_task left Markor open; the runner's reset(go_home=True) came after
    _ok(env, A.act("open_app", app_name="Markor"), A.act("navigate_back"))
    assert all(e["wait_to_stabilize"] for e in _events(device_log, mark) if e["event"] == "get_state")

    env = aw("id", tasks=["SystemBluetoothTurnOn"])  # start_on_home_screen = False
    mark = _mark(device_log)
    obs = env.reset(0)
    assert [e["go_home"] for e in _events(device_log, mark) if e["event"] == "reset"] == [False]
    assert "text='Bluetooth'" in obs


def test_params_are_seeded_as_the_suite_seeds_them():
    a, b = aw("id", tasks=["MarkorCreateNote"]), aw("id", tasks=["MarkorCreateNote"])
    goals = [a.reset(s) and a.task for s in range(6)]
    assert [b.reset(s) and b.task for s in range(6)] == goals and len(set(goals)) > 1
    assert a.reset(4) == b.reset(4)  # initialize_task draws its noise from the seeded params too


def test_success_needs_status_complete_and_is_successful():
    env = aw("ood", tasks=["ClockStopWatchRunning"])

    def solve():
        env.reset(0)
        _ok(env, A.act("open_app", app_name="Clock"))
        return _ok(env, A.act("click", index=_index(env, text="Start")))
    assert "Stopwatch running" in solve()
    _, r, done, info = env.step(A.act("status", goal_status="infeasible"))
    assert done and not info["success"] and r == 0.0
    solve()
    for _ in range(env.max_steps - 3):
        assert not env.step(A.act("wait"))[2]
    _, _, done, info = env.step(A.act("wait"))  # the goal holds, but the step budget ran out
    assert done and env.steps == env.max_steps == 10 and not info["success"]
    env.reset(0)
    assert env.step(A.STATUS_DONE)[3] == {"success": False, "action_is_valid": True}
    solve()
    assert env.step(A.STATUS_DONE)[3]["success"]


def test_information_task_is_checked_on_the_answer():
    env = aw("id", tasks=["MarkorCountNotes"])
    for answer in (None, "wrong", "count"):
        env.reset(1)
        obs = _ok(env, A.act("open_app", app_name="Markor"))
        notes = [l for l in obs.splitlines() if l.endswith(".md', content_description=None, class_name="
                                                          "'android.widget.TextView', hint_text=None, is_checked=False,"
                                                          " is_clickable=False, is_editable=False)")]
        if answer is not None:
            _, _, done, _ = env.step(A.act("answer", text=str(len(notes)) if answer == "count" else "0"))
            assert not done  # an answer does not end the episode
        assert env.step(A.STATUS_DONE)[3]["success"] == (answer == "count")


def test_input_text_appends_unless_clear_text_then_presses_enter(device_log):
    env = aw("id", tasks=["MarkorCreateNote"])
    env.reset(7)
    name, text = env.task.split("named ")[1].split(" with")[0], env.task.split("text: ")[1]
    _ok(env, A.act("open_app", app_name="Markor"))
    _ok(env, A.act("click", index=_index(env, content_description="Create a new file")))
    field = _index(env, hint_text="File name")
    mark = _mark(device_log)
    obs = _ok(env, A.act("input_text", text="ab", index=field))
    adb = [e["command"] for e in _events(device_log, mark) if e["event"] == "adb"]
    assert adb == ["tap", "input_text", "press_button"]  # focus the field, type, Enter
    assert "text='ab'" in obs and "hint_text='File name'" in obs
    assert "text='abcd'" in _ok(env, A.act("input_text", text="cd", index=field))
    obs = _ok(env, A.act("input_text", text=name, index=field, clear_text=True))
    assert f"text={name!r}" in obs and "abcd" not in obs
    _ok(env, A.act("input_text", text=text, index=_index(env, hint_text="Note text")))
    _ok(env, A.act("click", index=_index(env, text="Save")))
    assert env.step(A.STATUS_DONE)[3]["success"]
    env.reset(7)  # the note is gone again: initialize_task restored Markor's snapshot (reset only goes home)
    _ok(env, A.act("open_app", app_name="Markor"))
    assert name not in env.obs


def test_invalid_actions_are_steps_that_reach_no_device(device_log):
    env = aw("ood", tasks=["SystemWifiTurnOn"])
    screen = env.reset(2)
    mark = _mark(device_log)
    for k, a in enumerate(("oops", A.act("click", index=1), A.act("click", index=5), A.act("input_text", text="x"),
                           '{"action_type": "jump"}'), 1):  # 1 is hidden, 5 is below the screen
        obs, r, done, info = env.step(a)
        assert info == {"success": False, "action_is_valid": False} and not done and r == 0.0, a
        assert obs.startswith("Invalid action: ") and obs.split("\n", 1)[1] == screen and env.steps == k
    assert not [e for e in _events(device_log, mark) if e["event"] == "execute_action"]
    assert env.valid_actions()[-1] == A.STATUS_DONE and env.step(env.valid_actions()[0])[3]["action_is_valid"]


def test_device_error_ends_the_episode_and_a_dead_worker_is_replaced():
    env = aw("ood", tasks=["SystemWifiTurnOn"])
    env.reset(0)
    _ok(env, A.act("open_app", app_name="Settings"))
    obs, r, done, info = env.step(A.act("click", index=_index(env, text="About emulated device")))
    assert done and info == {"success": False, "action_is_valid": False} and r == 0.0
    assert obs.startswith("Device error: AdbControllerError: adb: device offline. The episode ends here.\n")
    env.reset(0)
    _ok(env, A.act("open_app", app_name="Settings"))
    old = env.device
    old.proc.kill()
    old.proc.join(5)
    obs, _, done, info = env.step(A.act("navigate_home"))
    assert done and not info["action_is_valid"] and obs.startswith("Device error: the android_world worker")
    env.reset(0)  # a fresh worker
    assert env.device is not old and env.device.alive() and not env.done
    assert env.step(A.act("open_app", app_name="Settings"))[3]["action_is_valid"]


# ----------------------------------------------------------------------------- branching by replay

def test_branching_replays_and_shares_one_emulator():
    env = aw("id", tasks=["MarkorCreateNote"])
    env.reset(5)
    _ok(env, A.act("open_app", app_name="Markor"))
    _ok(env, A.act("click", index=_index(env, content_description="Create a new file")))
    state = env.get_state()
    pickle.dumps(state)
    futures = [A.act("input_text", text="x", index=_index(env, hint_text="File name")), A.act("navigate_back")]
    seen = [env.step(a)[0] for a in futures]
    resets = env.resets
    env.set_state(state)
    assert env.resets == resets + 1 and env.obs == state["obs"] and env.steps == 2 and not env.done
    assert [env.step(a)[0] for a in futures] == seen
    now = env.get_state()
    env.set_state(now)  # already there: no replay
    assert env.resets == resets + 1 and env.get_state() == now
    other = aw("id", tasks=["MarkorCreateNote"])  # a second env on the same emulator (one worker per emulator)
    assert other.device is env.device
    other.set_state(state)
    assert other.obs == state["obs"]
    assert [other.step(a)[0] for a in futures] == seen
    obs = env.step(A.act("open_app", app_name="Markor"))[0]  # env takes the device back: replays its own episode
    assert env.resets == resets + 2 and "x.md" not in obs and env.steps == 5


def test_replay_that_sees_another_screen_ends_the_branch():
    env = aw("ood", tasks=["ClockStopWatchRunning"], freeze_datetime=False)  # the clock runs on
    env.reset(0)
    _ok(env, A.act("open_app", app_name="Clock"))
    state = env.get_state()
    env.step(A.act("wait"))
    env.set_state(state)
    assert env.done and not env.success and env.obs.startswith("Replay diverged at step 1: ")
    assert env.step(A.act("click", index=2)) == envs.after_done(env)


# ----------------------------------------------------------------------------- splits, options, ranks

def test_split_by_template_from_the_registry():
    names = aw("id").device.info["tasks"]
    ids, ood = A.split_tasks(names, "id"), A.split_tasks(names, "ood")
    assert A.split_tasks(names, "train") == ids and not set(ids) & set(ood) and set(ids) | set(ood) == set(names)
    assert ids == ["MarkorCountNotes", "MarkorCreateNote", "SystemBluetoothTurnOn"]
    assert ood == ["ClockStopWatchRunning", "SystemWifiTurnOn"]
    env = aw("ood")
    assert env.tasks == ood and [(env.reset(s), env.task_type)[1] for s in (0, 1, 2)] == ood + ood[:1]
    assert aw("train", tasks=["MarkorCreateNote", "SystemWifiTurnOn"]).tasks == ["MarkorCreateNote"]
    assert aw("ood", tasks="SystemWifiTurnOn").tasks == ["SystemWifiTurnOn"]  # one name as a string
    with pytest.raises(ValueError, match="unknown android_world task"):
        aw("id", tasks=["NoSuchTask"])
    with pytest.raises(ValueError, match="no android_world task of split 'id'"):
        aw("id", tasks=["SystemWifiTurnOn"])


def test_reachable_from_env_kwargs_with_clear_errors(monkeypatch, device_log):
    env = envs.make_env("android", "id", backend="android_world", android_world_path=FIXTURES, max_steps=3,
                        compact=True)
    assert env.reset(0).splitlines()[:2] == ["0: TextView 'Home'", "2: TextView 'Settings' clickable"]
    assert type(env).__name__ == "AndroidWorldEnv" and env.max_steps == 3
    for bad in ({"backend": "android_world", "templates": ["x"]}, {"backend": "textphone", "console_port": 1},
                {"backend": "emulator"}):
        with pytest.raises(ValueError):
            A.make_env("id", **bad)
    with pytest.raises(RuntimeError, match="no emulator on console port 5555"):
        aw("id", console_port=5555)
    if importlib.util.find_spec("android_world") is None:
        with pytest.raises(ImportError, match="android_world could not be imported"):
            A.make_env("id", backend="android_world", console_port=5560)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun: rank 1 drives the next emulator
    mark = _mark(device_log)
    aw("id", adb_path="~/sdk/adb").reset(0)
    launch = [e for e in _events(device_log, mark) if e["event"] == "load_and_setup_env"]
    assert [(e["console_port"], e["grpc_port"], e["adb_path"]) for e in launch] == [
        (5556, 8555, os.path.expanduser("~/sdk/adb"))]


def test_evaluate_plays_only_the_named_templates(monkeypatch, capsys):
    import evaluate
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--env", "android", "--split", "ood", "--templates",
                                      "disable_alarm", "--episodes", "2", "--max-new-tokens", "4", "--show", "2"])
    evaluate.main()
    out = capsys.readouterr().out
    assert out.count("=== episode") == 2 and out.count("Turn off the") == 2, out
    assert "disable_alarm" in out and "update_contact_phone" not in out


def test_evaluate_samples_every_task_k_times_and_reports_pass_at_k(monkeypatch, capsys, tmp_path):
    import json
    from types import SimpleNamespace
    import evaluate
    eps = [SimpleNamespace(seed=s, success=ok) for s, ok in [(1, False), (1, True), (2, False), (2, False), (3, True)]]
    assert evaluate.pass_at_k(eps) == (2, 3)
    out_json = tmp_path / "m.json"
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--env", "android", "--split", "ood", "--episodes", "2",
                                      "--samples", "3", "--temperature", "1.0", "--max-new-tokens", "4",
                                      "--show", "6", "--out", str(out_json)])
    evaluate.main()
    out = capsys.readouterr().out
    seeds = [line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("=== episode")]
    assert len(seeds) == 6 and len(set(seeds)) == 2 and seeds[:3] == [seeds[0]] * 3, seeds
    assert "pass@3: " in out and " of 2 tasks" in out
    m = json.loads(out_json.read_text())
    assert m["samples"] == 3 and 0.0 <= m["pass_at_k"] <= 1.0
    per = m["per_episode"]     # what each episode did, kept for reading failures after the run
    assert len(per) == 6 and all(len(r["actions"]) == r["steps"] and r["task"] for r in per), per
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--env", "android", "--samples", "2"])
    with pytest.raises(SystemExit, match="temperature"):
        evaluate.main()
