"""Tests for android_env: the offline TextPhone stand-in and the AndroidWorld adapter (against a fake)."""
import dataclasses
import json
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

import android_env as A


def _env(template):
    return A.TextPhone(templates=[template])


def _run(env, plan):
    info = {}
    for a in plan:
        _, _, done, info = env.step(a)
        assert info["action_is_valid"], (a, info)
    return info


@pytest.mark.parametrize("template", list(A.TEMPLATES))
def test_expert_solves_each_template(template):
    env = _env(template)
    for seed in range(5):
        env.reset(seed)
        assert env.task and not env.check()
        plan = env.expert_plan()
        assert plan is not None and len(plan) <= env.max_steps, (seed, plan)
        _run(env, plan)
        assert env.done and env.success and env.steps == len(plan)


def test_expert_plan_from_mid_episode_after_detours():
    rng = np.random.default_rng(0)
    for split in ("train", "ood"):
        env = A.make_env(split)
        for seed in A.split_seeds(split, 40):
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
            assert env.success, (seed, env.template)


def _near_miss(template, old, new, seed=0):
    """Run the expert plan with one typed value replaced; return success."""
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
    wrong = next(k for k in A.SETTINGS if k != env.params["setting"])
    env.step(A.act("click", index=A._find(env, text=wrong)))
    _, r, done, info = env.step(A.STATUS_DONE)
    assert done and not info["success"] and r == 0.0


def test_step_cap_ends_episode_and_checks_goal():
    env = _env("toggle_setting")
    env.reset(3)
    plan = env.expert_plan()[:-1]  # solve it, never say complete
    _run(env, plan + [A.act("wait")] * (env.max_steps - len(plan) - 1))
    assert not env.done
    _, _, done, info = env.step(A.act("wait"))
    assert done and info["success"]


def test_set_state_round_trip():
    env = A.make_env("train")
    rng = np.random.default_rng(1)
    for seed in A.split_seeds("train", 6):
        env.reset(seed)
        env.step(env.expert_plan()[0])
        state = env.get_state()
        pickle.dumps(state)
        acts = [a for a in env.valid_actions() if '"status"' not in a]
        acts = [acts[int(i)] for i in rng.integers(len(acts), size=4)]
        first = [env.step(a)[0] for a in acts]
        env.set_state(state)
        assert env.render() == state["obs"]
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
    '{"action_type": "open_app"}', '{"action_type": "answer"}', '{"action_type": "status", "goal_status": "done"}',
    '{"action_type": "status"}', "Action: {bad json", '[{"action_type": "wait"}]',
]


def test_bad_input_is_an_invalid_step_and_never_raises():
    env = A.make_env("train", max_steps=100)
    screen = env.reset(5)
    for i, a in enumerate(BAD):
        obs, r, done, info = env.step(a)
        assert not info["action_is_valid"] and info["error"], a
        assert obs.startswith("Invalid action: ") and obs.split("\n", 1)[1] == screen, a
        assert env.steps == i + 1 and not done and r == 0.0
    obs, _, _, info = env.step(123)  # not even a string
    assert not info["action_is_valid"]


def test_action_prefix_and_forms_accepted():
    env = A.make_env("train")
    env.reset(7)
    for a in ('Action: {"action_type": "open_app", "app_name": "notes"}',
              'Reason: the action: go back.\nAction: {"action_type": "navigate_back"}',
              '{"action_type": "click", "index": "3"}', '{"action_type": "navigate_home"}',
              '{"action_type": "click", "x": 500, "y": 250}'):  # y=250 -> row 0... element 0 is the title
        obs, _, _, info = env.step(a)
        assert info["action_is_valid"], (a, info)
    assert "text='Home'" in obs
    env.step('{"action_type": "click", "x": 10, "y": 350}')  # row 1 = Contacts
    assert "text='Contacts'" in env.render().splitlines()[0]


def test_scroll_pages_long_lists():
    env = _env("delete_contact")
    for seed in range(20):
        env.reset(seed)
        if len(env.data["contacts"]) > A.PAGE:
            break
    env.step(A.act("open_app", app_name="Contacts"))
    names = [c["name"] for c in env.data["contacts"]]
    assert names[0] in env.render() and names[-1] not in env.render()
    env.step(A.act("scroll", direction="down"))
    assert names[-1] in env.render() and names[0] not in env.render()
    env.step(A.act("swipe", direction="down"))  # swiping down scrolls back up
    assert names[0] in env.render()


def test_typing_into_a_field_and_rendering():
    env = _env("create_note")
    env.reset(0)
    env.step(A.act("open_app", app_name="Notes"))
    env.step(A.act("click", index=A._find(env, desc="New note")))
    line = env.render().splitlines()[1]
    assert line == ("UI element 1: UIElement(text=None, content_description='Title', "
                    "class_name='android.widget.EditText', is_clickable=True, is_editable=True)")
    env.step(A.act("input_text", text="  Hi  ", index=1))
    assert "text='Hi', content_description='Title'" in env.render()
    env.step(A.act("input_text", text="", index=1))
    _, _, _, info = env.step(A.act("click", index=A._find(env, text="Save")))
    assert info["action_is_valid"] and "A note needs a title" in env.render() and len(env.stack) == 3
    env.step(A.act("input_text", text="Hi", index=1))
    assert "needs a title" not in env.render()
    env.step(A.act("click", index=A._find(env, text="Save")))
    assert env.stack[-1]["name"] == "notes" and any(n["title"] == "Hi" for n in env.data["notes"])


def test_valid_actions_are_valid():
    env = A.make_env("ood")
    rng = np.random.default_rng(3)
    for seed in A.split_seeds("ood", 5):
        env.reset(seed)
        while not env.done:
            acts = env.valid_actions()
            _, _, _, info = env.step(acts[int(rng.integers(len(acts)))])
            assert info["action_is_valid"], info


def test_determinism_per_seed():
    a, b = A.make_env("train"), A.make_env("train")
    tasks = set()
    for seed in A.split_seeds("train", 10):
        assert a.reset(seed) == b.reset(seed) and a.task == b.task
        assert a.expert_plan() == b.expert_plan() and a.get_state() == b.get_state()
        tasks.add(a.task)
    assert len(tasks) > 5


def test_splits_and_templates():
    tr, i_d, ood = (set(A.split_seeds(s, 1000)) for s in ("train", "id", "ood"))
    assert not (tr & i_d) and not (tr & ood) and not (i_d & ood)
    assert A.split_seeds("id", 3, start=5) == [1_000_005, 1_000_006, 1_000_007]
    assert set(A.ID_TEMPLATES).isdisjoint(A.OOD_TEMPLATES) and len(A.TEMPLATES) >= 12
    env = A.make_env("ood")
    seen = {(env.reset(s), env.template)[1] for s in A.split_seeds("ood", 40)}
    assert seen == set(A.OOD_TEMPLATES)
    with pytest.raises(ValueError):
        A.make_env("test")
    with pytest.raises(ValueError):
        A.split_seeds("dev", 3)
    with pytest.raises(ValueError):
        A.TextPhone(templates=["no_such_task"])
    env = A.make_env("id", max_steps=3)
    env.reset(0)
    assert env.max_steps == 3


def test_state_similarity():
    env = A.make_env("train")
    obs = env.reset(0)
    assert env.state_similarity(obs, obs) == 1.0
    assert env.state_similarity(obs.replace("\n", "  \n "), obs) == 1.0
    assert env.state_similarity("nothing", obs) == 0.0
    half = "\n".join(obs.splitlines()[:4])
    assert 0.0 < env.state_similarity(half, obs) < 1.0
    assert env.state_similarity("", "") == 1.0
    assert "JSON" in env.action_hint() and "input_text" in A.RULES


# ----------------------------------------------------------------------------- adapter against a fake

@dataclasses.dataclass
class FakeJSONAction:  # same fields as android_world's JSONAction
    action_type: str = None
    index: int = None
    x: int = None
    y: int = None
    text: str = None
    direction: str = None
    goal_status: str = None
    app_name: str = None


def _ui(text, cls, click=False, edit=False, visible=True):
    return SimpleNamespace(text=text, content_description=None, class_name=cls, is_clickable=click,
                           is_editable=edit, is_visible=visible, bbox_pixels=None)


class FakeAsyncEnv:
    """A one-screen counter 'phone' with AsyncEnv's reset/get_state/execute_action."""
    def __init__(self):
        self.count, self.typed, self.executed = 0, "", []

    def reset(self, go_home=False):
        self.count, self.typed = 0, ""
        return self.get_state()

    def get_state(self, wait_to_stabilize=False):
        return SimpleNamespace(ui_elements=[
            _ui(f"Count: {self.count}", A.TV), _ui("+1", A.BTN, click=True),
            _ui(self.typed or None, A.EDIT, click=True, edit=True), _ui("hidden", A.TV, visible=False)])

    def execute_action(self, action):
        assert isinstance(action, FakeJSONAction)
        self.executed.append(action)
        if action.action_type == "click" and action.index == 1:
            self.count += 1
        if action.action_type == "input_text":
            self.typed = action.text


class FakeTask:
    def __init__(self, seed):
        self.target, self.initialized, self.complexity = 2 + seed % 2, False, 0.5

    @property
    def goal(self):
        return f"Make the count {self.target}."

    def initialize_task(self, env):
        assert not self.initialized, "initialize_task twice"
        self.initialized = True

    def is_successful(self, env):
        return 1.0 if env.count == self.target else 0.0

    def tear_down(self, env):
        self.initialized = False


def _adapter():
    return A.AndroidWorldEnv(FakeAsyncEnv(), FakeTask, json_action=FakeJSONAction)


def test_adapter_episode_and_rendering():
    env = _adapter()
    obs = env.reset(0)
    assert env.task == "Make the count 2." and env.max_steps == 5 and env.name == "android"
    assert obs.splitlines()[1] == ("UI element 1: UIElement(text='+1', content_description=None, "
                                   "class_name='android.widget.Button', is_clickable=True, is_editable=False)")
    assert "hidden" not in obs and len(obs.splitlines()) == 3  # invisible elements are not listed
    env.step('Action: {"action_type": "click", "index": 1}')
    obs, _, _, info = env.step('{"action_type": "click", "index": 1}')
    assert "Count: 2" in obs and info["action_is_valid"]
    env.step(A.act("input_text", text="hi", index=2))
    assert env.aw.executed[-1] == FakeJSONAction(action_type="input_text", text="hi", index=2)
    _, r, done, info = env.step(A.STATUS_DONE)
    assert done and info["success"] and r == 1.0 and len(env.aw.executed) == 3  # status is not sent to the device


def test_adapter_bad_input_and_step_cap():
    env = _adapter()
    screen = env.reset(1)
    for a in ("oops", '{"action_type": "click", "index": 9}', '{"action_type": "jump"}'):
        obs, _, done, info = env.step(a)
        assert not info["action_is_valid"] and obs == f"Invalid action: {info['error']}\n{screen}"
    assert env.aw.executed == []
    env.step(A.act("click", index=1))
    _, _, done, info = env.step(A.act("click", index=1))  # 5th step = cap; goal was count 3
    assert done and not info["success"]
    assert env.step(A.act("wait"))[2]


def test_adapter_branching_replays_from_reset():
    env = _adapter()
    env.reset(0)
    env.step(A.act("click", index=1))
    state = env.get_state()
    nxt = env.step(A.act("click", index=1))[0]
    resets = env.resets
    env.set_state(state)
    assert env.resets == resets + 1 and env.render() == state["obs"] and env.steps == 1
    assert env.step(A.act("click", index=1))[0] == nxt
    assert env.expert_plan() is None and A.STATUS_DONE in env.valid_actions()


def test_adapter_needs_android_world():
    try:
        import android_world  # noqa: F401
        pytest.skip("android_world is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="not on PyPI"):
        A.AndroidWorldEnv(FakeAsyncEnv(), FakeTask)


def test_compact_screens_are_shorter_and_still_solvable():
    seeds = A.split_seeds("train", 6)
    for s in seeds:
        full, short = A.make_env("train"), A.make_env("train", compact=True)
        a, b = full.reset(s), short.reset(s)
        assert len(b) * 3 < len(a) and len(a.splitlines()) == len(b.splitlines())
        for act_ in short.expert_plan():
            short.step(act_)
        assert short.success
