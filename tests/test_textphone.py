"""Tests for TextPhone, the offline stand-in for AndroidWorld (textphone.py, textphone_tasks.py)."""
import json
import pickle

import numpy as np
import pytest

import android_env as A
import envs
import textphone as T
from textphone_tasks import OOD_TEMPLATES, ID_TEMPLATES, SETTINGS, TEMPLATES, _find


def _env(template):
    return T.TextPhone(templates=[template])


def _run(env, plan):
    info = {}
    for a in plan:
        _, _, done, info = env.step(a)
        assert info["action_is_valid"], (a, env.obs)
    return info


@pytest.mark.parametrize("template", list(TEMPLATES))
def test_expert_solves_each_template(template):
    env = _env(template)
    for seed in range(5):
        env.reset(seed)
        assert env.task and not env.check() and env.task_type == template
        plan = env.expert_plan()
        assert plan is not None and len(plan) <= env.max_steps, (seed, plan)
        _run(env, plan)
        assert env.done and env.success and env.steps == len(plan)


def test_expert_plan_from_mid_episode_after_detours():
    rng = np.random.default_rng(0)
    for split in ("train", "ood"):
        env = A.make_env(split)
        for seed in envs.split_seeds(split, 40):
            env.reset(seed)
            for _ in range(int(rng.integers(1, 6))):
                acts = [a for a in env.valid_actions() if '"status"' not in a]
                env.step(acts[int(rng.integers(len(acts)))])
            if env.done:
                continue
            plan = env.expert_plan()
            if plan is None:  # the detour destroyed something the task needs: then the check must fail too
                assert not env.check()
                continue
            env.max_steps = 10 ** 6
            _run(env, plan)
            assert env.success, (seed, env.task_type)


def _near_miss(template, old, new, seed=0):
    """Run the expert plan with one typed value replaced; return (done, success)."""
    env = _env(template)
    env.reset(seed)
    plan = [a.replace(json.dumps(old), json.dumps(new)) if '"input_text"' in a or '"answer"' in a else a
            for a in env.expert_plan()]
    assert plan != env.expert_plan()
    _run(env, plan)
    return env.done, env.success


def test_checks_reject_near_misses():
    for seed in range(3):
        env = _env("add_contact"); env.reset(seed)
        phone = env.params["phone"]
        assert _near_miss("add_contact", phone, phone[:-1] + str((int(phone[-1]) + 1) % 10), seed) == (True, False)
        env = _env("set_alarm"); env.reset(seed)
        h, m = env.params["time"].split(":")
        if not env.params.get("existing"):   # the switched-off variant types nothing
            assert _near_miss("set_alarm", m, f"{(int(m) + 1) % 60:02d}", seed) == (True, False)
        env = _env("send_message"); env.reset(seed)
        assert _near_miss("send_message", env.params["text"], env.params["text"] + "!", seed) == (True, False)
        env = _env("add_expense"); env.reset(seed)
        amt = env.params["amount"]
        assert _near_miss("add_expense", amt, str(int(amt) + 1), seed) == (True, False)
        env = _env("answer_phone"); env.reset(seed)
        ph = env.params["phone"]
        assert _near_miss("answer_phone", ph, ph[:-1] + str((int(ph[-1]) + 3) % 10), seed) == (True, False)
        env = _env("rename_file"); env.reset(seed)
        assert _near_miss("rename_file", env.params["new"], "x" + env.params["new"], seed) == (True, False)


def test_set_alarm_sometimes_asks_for_a_switched_off_alarm():
    """disable_alarm (OOD) needs the clock list's alarm switch; set_alarm (ID) must teach that move, so that the
    held-out template tests a new goal over a known move (before, no ID oracle ever touched an alarm switch)."""
    env, switched = _env("set_alarm"), 0
    for seed in envs.split_seeds("train", 40):
        env.reset(seed)
        plan = env.expert_plan()
        moves = []
        for a in plan:
            el = env.elements()[A.parse_action(a)["index"]] if '"click"' in a else None
            moves.append(el and el["do"] and el["do"][0])
            env.step(a)
        assert env.success
        if env.params.get("existing"):
            switched += 1
            assert "toggle_alarm" in moves and not any('"input_text"' in a for a in plan), plan
    assert 5 <= switched <= 35


def test_wrong_item_deleted_fails_and_is_unsolvable():
    env = _env("delete_note")
    env.reset(1)
    other = next(n for n in env.data["notes"] if n["id"] != env.params["target_id"])
    env.data["notes"].remove(other)
    env.data["notes"] = [n for n in env.data["notes"] if n["id"] != env.params["target_id"]]
    assert not env.check() and env.expert_plan() is None


def test_toggle_wrong_setting_and_premature_status_fail():
    env = _env("toggle_setting")
    env.reset(2)
    env.step(A.act("open_app", app_name="Settings"))
    wrong = next(k for k in SETTINGS if k != env.params["setting"])
    env.step(A.act("click", index=_find(env, text=wrong)))
    _, r, done, info = env.step(A.STATUS_DONE)
    assert done and not info["success"] and r == 0.0


def test_the_step_cap_ends_the_episode_as_a_failure_even_when_the_goal_holds():
    env = _env("toggle_setting")
    env.reset(3)
    plan = env.expert_plan()[:-1]  # solve it, never say complete
    _run(env, plan + [A.act("wait")] * (env.max_steps - len(plan) - 1))
    assert not env.done and env.check()
    _, r, done, info = env.step(A.act("wait"))
    assert done and not info["success"] and r == 0.0      # success needs status complete (AndroidWorld's rule)


def test_infeasible_ends_as_a_failure_even_when_the_goal_holds():
    env = _env("toggle_setting")
    env.reset(3)
    _run(env, env.expert_plan()[:-1])
    assert env.check()
    _, r, done, info = env.step(A.act("status", goal_status="infeasible"))
    assert done and not info["success"] and r == 0.0


def test_step_after_done_changes_and_counts_nothing():
    env = _env("toggle_setting")
    env.reset(3)
    _run(env, env.expert_plan())
    state = env.get_state()
    assert env.step(A.act("navigate_home")) == (env.obs, 0.0, True, {"success": True, "action_is_valid": False})
    assert env.get_state() == state


def test_set_state_round_trip():
    env = A.make_env("train")
    rng = np.random.default_rng(1)
    for seed in envs.split_seeds("train", 6):
        env.reset(seed)
        env.step(env.expert_plan()[0])
        state = env.get_state()
        assert isinstance(state, dict)
        pickle.dumps(state)
        acts = [a for a in env.valid_actions() if '"status"' not in a]
        acts = [acts[int(i)] for i in rng.integers(len(acts), size=4)]
        first = [env.step(a)[0] for a in acts]
        env.set_state(state)
        assert env.obs == state["obs"]
        assert [env.step(a)[0] for a in acts] == first
        env.set_state(state)  # the snapshot itself was not mutated by stepping
        assert env.get_state() == state


BAD = [
    "", "hello", "{", "[1, 2]", "null", '{"action_type": "fly"}', '{"index": 1}', '{"action_type": "click"}',
    '{"action_type": "click", "index": 99}', '{"action_type": "click", "index": -1}',
    '{"action_type": "click", "index": "a"}', '{"action_type": "click", "index": true}',
    '{"action_type": "click", "index": 1.5}', '{"action_type": "click", "index": 1, "x": 3, "y": 4}',
    '{"action_type": "click", "x": 5, "y": 10}', '{"action_type": "click", "index": 1, "reason": "x"}',
    '{"action_type": "input_text", "text": "x", "index": 1}', '{"action_type": "input_text", "index": 1}',
    '{"action_type": "input_text", "text": "x"}', '{"action_type": "scroll", "direction": "sideways"}',
    '{"action_type": "scroll"}', '{"action_type": "open_app", "app_name": "Chrome"}',
    '{"action_type": "open_app", "app_name": "Notes"}', '{"action_type": "open_app"}', '{"action_type": "answer"}',
    '{"action_type": "status", "goal_status": "done"}', '{"action_type": "status"}', "Action: {bad json",
    '[{"action_type": "wait"}]', '{"action_type": "click", "index": 1, "clear_text": true}',
]


def test_bad_input_is_an_invalid_step_and_never_raises():
    env = A.make_env("train", max_steps=100)
    screen = env.reset(5)
    for i, a in enumerate(BAD):
        obs, r, done, info = env.step(a)
        assert info == {"success": False, "action_is_valid": False}, a
        assert obs.startswith("Invalid action: ") and obs.split("\n", 1)[1] == screen, a
        assert env.steps == i + 1 and not done and r == 0.0
    obs, _, _, info = env.step(123)  # not even a string
    assert not info["action_is_valid"] and obs.startswith("Invalid action: action must be a string")


def test_action_prefix_and_forms_accepted():
    env = A.make_env("train")
    env.reset(7)
    for a in ('Action: {"action_type": "open_app", "app_name": "markor"}',
              'Reason: the action: go back.\nAction: {"action_type": "navigate_back"}',
              '{"action_type": "click", "index": "3"}', '{"action_type": "navigate_home"}',
              '{"action_type": "click", "x": 500, "y": 250}'):  # y=250 -> row 0: the title, nothing happens
        obs, _, _, info = env.step(a)
        assert info["action_is_valid"], (a, obs)
    assert "text='Home'" in obs
    env.step('{"action_type": "click", "x": 10, "y": 350}')  # row 1 = Contacts
    assert "text='Contacts'" in env.obs.splitlines()[0]


def test_app_names_are_android_worlds():
    env = A.make_env("train")
    env.reset(0)
    for name, title in (("Markor", "Notes"), ("Pro Expense", "Expenses"), ("Simple SMS Messenger", "Messages"),
                        ("simple sms", "Messages"), ("pro expense app", "Expenses"), ("System Settings", "Settings"),
                        ("Contacts", "Contacts"), ("Clock", "Alarms"), ("Files", "Files")):
        obs, _, _, info = env.step(A.act("open_app", app_name=name))
        assert info["action_is_valid"] and f"text={title!r}" in obs.splitlines()[0], name
    home = [l for l in env.reset(0).splitlines() if "is_clickable=True" in l]
    assert [l.split("'")[1] for l in home] == list(T.APPS)


def test_scroll_pages_long_lists_with_or_without_index():
    env = _env("delete_contact")
    for seed in range(20):
        env.reset(seed)
        if len(env.data["contacts"]) > env.PAGE:
            break
    env.step(A.act("open_app", app_name="Contacts"))
    names = [c["name"] for c in env.data["contacts"]]
    assert names[0] in env.obs and names[-1] not in env.obs
    env.step(A.act("scroll", direction="down"))  # no index: the screen scrolls
    assert names[-1] in env.obs and names[0] not in env.obs
    env.step(A.act("swipe", direction="down"))  # swiping down scrolls back up
    assert names[0] in env.obs
    env.step(A.act("scroll", direction="down", index=2))
    assert names[-1] in env.obs


def test_typing_appends_clear_text_replaces_and_rendering():
    env = _env("create_note")
    env.reset(0)
    env.step(A.act("open_app", app_name="Markor"))
    env.step(A.act("click", index=_find(env, content_description="New note")))
    line = env.obs.splitlines()[1]
    assert line == ("UI element 1: UIElement(text=None, content_description=None, class_name='android.widget.EditText'"
                    ", hint_text='Title', is_checked=False, is_clickable=True, is_editable=True)")
    env.step(A.act("input_text", text="Hi", index=1))
    assert "text='Hi', content_description=None, class_name='android.widget.EditText', hint_text='Title'" in env.obs
    env.step(A.act("input_text", text=" there", index=1))  # as on the device: after what the field holds
    assert "text='Hi there'" in env.obs
    env.step(A.act("input_text", text="Yo", index=1, clear_text=True))
    assert "text='Yo'" in env.obs and "Hi there" not in env.obs
    _, _, _, info = env.step(A.act("input_text", text="", index=1, clear_text=True))  # no text: nothing happens
    assert info["action_is_valid"] and "text='Yo'" in env.obs
    assert not env.step(A.act("input_text", text="x", index=0))[3]["action_is_valid"]  # the title is not a field


def test_form_errors_and_save():
    env = _env("create_note")
    env.reset(0)
    env.step(A.act("open_app", app_name="Markor"))
    env.step(A.act("click", index=_find(env, content_description="New note")))
    _, _, _, info = env.step(A.act("click", index=_find(env, text="Save")))
    assert info["action_is_valid"] and "A note needs a title" in env.obs and len(env.stack) == 3
    env.step(A.act("input_text", text="Hi", index=1))
    assert "needs a title" not in env.obs
    env.step(A.act("click", index=_find(env, text="Save")))
    assert env.stack[-1]["name"] == "notes" and any(n["title"] == "Hi" for n in env.data["notes"])


def test_switches_show_is_checked():
    env = _env("toggle_setting")
    env.reset(2)
    env.step(A.act("open_app", app_name="Settings"))
    k = env.params["setting"]
    line = next(l for l in env.obs.splitlines() if f"text={k!r}" in l)
    assert "class_name='android.widget.Switch'" in line and f"is_checked={env.data['settings'][k]}" in line
    assert "'On'" not in env.obs and "'Off'" not in env.obs
    env.step(A.act("click", index=_find(env, text=k)))
    assert f"is_checked={env.data['settings'][k]}" in next(l for l in env.obs.splitlines() if f"text={k!r}" in l)
    compact = T.TextPhone(["toggle_setting"], compact=True)
    compact.reset(2)
    compact.step(A.act("open_app", app_name="Settings"))
    assert all(l.endswith((" on", " off")) for l in compact.obs.splitlines()[1:])


def test_valid_actions_are_valid():
    env = A.make_env("ood")
    rng = np.random.default_rng(3)
    for seed in envs.split_seeds("ood", 5):
        env.reset(seed)
        while not env.done:
            acts = env.valid_actions()
            _, _, _, info = env.step(acts[int(rng.integers(len(acts)))])
            assert info["action_is_valid"], info


def test_determinism_per_seed():
    a, b = A.make_env("train"), A.make_env("train")
    tasks = set()
    for seed in envs.split_seeds("train", 10):
        assert a.reset(seed) == b.reset(seed) and a.task == b.task
        assert a.expert_plan() == b.expert_plan() and a.get_state() == b.get_state()
        tasks.add(a.task)
    assert len(tasks) > 5


def test_protocol_attributes_and_info_keys():
    env = A.make_env("id")
    assert not hasattr(A, "split_seeds") and not hasattr(T, "split_seeds")
    env.reset(envs.split_seeds("id", 1)[0])
    assert env.name == "android" and env.rules == T.RULES and "clear_text" in env.rules
    assert env.task_type in ID_TEMPLATES and env.max_steps > 0 and env.steps == 0 and not env.done
    _, _, _, info = env.step(A.act("wait"))
    assert set(info) == {"success", "action_is_valid"} and env.steps == 1


def test_splits_templates_and_options():
    assert set(ID_TEMPLATES).isdisjoint(OOD_TEMPLATES) and len(ID_TEMPLATES) == 10 and len(OOD_TEMPLATES) == 4
    env = A.make_env("ood")
    seen = {(env.reset(s), env.task_type)[1] for s in envs.split_seeds("ood", 40)}
    assert seen == set(OOD_TEMPLATES)
    assert A.make_env("ood", templates=["disable_alarm", "add_contact"]).templates == ["disable_alarm"]
    for bad in (lambda: A.make_env("test"), lambda: T.TextPhone(templates=["no_such_task"]),
                lambda: A.make_env("id", templates=["no_such_task"]),
                lambda: A.make_env("ood", templates=["add_contact"]), lambda: A.make_env("id", colour="red"),
                lambda: A.make_env("id", backend="ios")):
        with pytest.raises(ValueError):
            bad()
    env = A.make_env("id", max_steps=3)
    env.reset(0)
    assert env.max_steps == 3
    assert type(envs.make_env("android", "id")).__name__ == "TextPhone"


def test_state_similarity():
    env = A.make_env("train")
    obs = env.reset(0)
    assert env.state_similarity(obs, obs) == 1.0
    assert env.state_similarity(obs.replace("\n", "  \n "), obs) == 1.0
    assert env.state_similarity("nothing", obs) == 0.0
    half = "\n".join(obs.splitlines()[:4])
    assert 0.0 < env.state_similarity(half, obs) < 1.0
    assert env.state_similarity("", "") == 1.0
    assert "JSON" in env.action_hint() and "input_text" in T.RULES


def test_compact_screens_are_shorter_and_still_solvable():
    for s in envs.split_seeds("train", 6):
        full, short = A.make_env("train"), A.make_env("train", compact=True)
        a, b = full.reset(s), short.reset(s)
        assert len(b) * 3 < len(a) and len(a.splitlines()) == len(b.splitlines())
        for act_ in short.expert_plan():
            short.step(act_)
        assert short.success


def test_future_text_keeps_the_changed_lines_and_counts_the_rest():
    env = A.make_env("train", compact=True, future_lines=2)
    assert envs.future_text(env, "a\nb\nc", "a\nx\ny\nz\nw") == "x\ny\n(+2 more)"
    assert envs.future_text(env, "a\nb", "b\nx") == "x"
    assert envs.future_text(env, "a\nb", "a\nb") == "(no change)"
    assert envs.future_text(A.make_env("train"), "a\nb", "a\nx") == "a\nx"      # the default: the whole screen
    for bad in (-1, "3", 1.5, True):
        with pytest.raises(ValueError):
            A.make_env("train", future_lines=bad)


def test_future_lines_write_the_element_an_action_touches():
    """Typing into a form's field changes one line: that line is the future screen a trace writes; the screen
    the agent sees (env.obs, the prompt) stays whole."""
    env = A.make_env("train", compact=True, future_lines=3, templates=["rename_file"])
    env.reset(envs.split_seeds("train", 1)[0])
    plan = env.expert_plan()
    while not any('"input_text"' in a for a in plan[:1]):
        env.step(plan[0])
        plan = env.expert_plan()
    prev = env.obs
    obs, _, _, _ = env.step(plan[0])
    changed = envs.future_text(env, prev, obs)
    assert len(changed.splitlines()) == 1 and "EditText" in changed and changed in obs
    assert env.obs == obs and len(obs.splitlines()) > 1
