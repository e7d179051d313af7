"""ALFWorld env: generated games played by the real engine (alfworld==0.4.2)."""
import json
import os
import pickle

import numpy as np
import pytest

import alfworld_env as A


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("alfworld_cache"))


@pytest.fixture(scope="module")
def env(cache):
    return A.make_env("train", cache_dir=cache, data="generated")


def play(env, actions):
    return [env.step(a) for a in actions]


def test_expert_solves_every_task_type(env, cache):
    seen = set()
    for seed in range(6):
        obs = env.reset(seed)
        traj = json.load(open(os.path.join(cache, "train", str(seed), "traj_data.json")))
        seen.add(traj["task_type"])
        assert "Your task is to: " in obs and env.task and env.task in obs
        assert "go to" in env.action_hint() and env.action_hint().startswith("Admissible commands: ")
        plan = env.expert_plan()
        assert plan, f"expert failed on {traj['task_type']}"
        for i, a in enumerate(plan):
            obs, r, done, info = env.step(a)
            assert info["action_is_valid"], a
            assert done == (i == len(plan) - 1)
        assert info["success"] and env.success and env.done and r == 1.0
    assert seen == set(A.TASK_TYPES)


def test_set_state_same_as_replay(env, cache):
    rng = np.random.default_rng(0)
    env.reset(3)
    prefix = []
    for _ in range(3):
        prefix.append(env.valid_actions()[rng.integers(len(env.valid_actions()))])
        env.step(prefix[-1])
    snap, adm = pickle.loads(pickle.dumps(env.get_state())), env.valid_actions()
    tail = [env.valid_actions()[rng.integers(len(env.valid_actions()))]]
    first = play(env, tail)
    tail += [env.valid_actions()[0], "not a command", env.valid_actions()[-1]]
    first += play(env, tail[1:])
    env.reset(5)  # elsewhere, then branch back
    env.set_state(snap)
    assert env.render() == snap["obs"] and env.steps == 3 and env.valid_actions() == adm
    again = play(env, tail)
    assert [o for o, *_ in again] == [o for o, *_ in first]
    fresh = A.make_env("train", cache_dir=cache, data="generated")
    fresh.reset(3)
    replay = play(fresh, prefix + tail)[3:]
    assert [o for o, *_ in replay] == [o for o, *_ in first]


def test_invalid_and_garbage_are_invalid_steps(env):
    env.reset(0)
    adm, obs0 = env.valid_actions(), env.render()
    for bad in ["fly to the moon", "", "<action>\x00\ud800 ))) go to", "go to nowhere 99", "a" * 5000]:
        obs, r, done, info = env.step(bad)
        assert obs == "Nothing happens." and not info["action_is_valid"] and not info["success"] and r == 0.0
    assert env.steps == 5 and env.valid_actions() == adm and obs0 != env.render()


def test_action_normalisation(env):
    assert A.normalize_action("  Go  to   Drawer 1. ") == "go to drawer 1"
    assert A.normalize_action("put apple 1 in/on fridge 1") == "move apple 1 to fridge 1"
    assert A.normalize_action("Put Apple 1 on CounterTop 2.") == "move apple 1 to countertop 2"
    env.reset(0)
    plan = env.expert_plan()
    assert plan[-1].startswith("move ")
    play(env, plan[:-1])
    o, t = plan[-1][len("move "):].split(" to ")
    obs, r, done, info = env.step(f"Put {o.title()}  in {t.upper()}.")
    assert info["action_is_valid"] and info["success"] and done


def test_planner_expert(cache):
    e = A.make_env("train", cache_dir=cache, data="generated", expert="planner")
    e.reset(4)
    e.step(e.valid_actions()[0])
    plan = e.expert_plan()
    outs = play(e, plan)
    assert all(i["action_is_valid"] for *_, i in outs) and e.success


def test_max_steps_and_similarity(cache):
    e = A.make_env("train", cache_dir=cache, data="generated", max_steps=3)
    e.reset(0)
    outs = play(e, ["x", "look", "y"])
    assert [d for _, _, d, _ in outs] == [False, False, True] and not e.success and e.steps == 3
    assert e.state_similarity("You arrive at Drawer 1.", "you arrive at drawer 1") == 1.0
    assert e.state_similarity("nothing", "You arrive at drawer 1.") == 0.0
    assert 0 < e.state_similarity("On the drawer 1, you see a key.", "On the drawer 2, you see a key.") < 1


def test_generation_deterministic(cache, tmp_path):
    a = A.generate_game("train", 0, cache_dir=cache)
    b = A.generate_game("train", 0, cache_dir=str(tmp_path))
    assert open(a).read() == open(b).read()
    assert json.load(open(a))["pddl_problem"] != json.load(open(A.generate_game("train", 6, cache_dir=cache)))["pddl_problem"]
    e1, e2 = A.make_env("train", cache_dir=cache, data="generated"), A.make_env("train", cache_dir=str(tmp_path), data="generated")
    assert e1.reset(0) == e2.reset(0)


def test_splits_disjoint(cache):
    assert not set(A.OOD_SCENES) & set(A.TRAIN_SCENES)
    seeds = {s: set(A.split_seeds(s, 1000)) for s in ("train", "id", "ood")}
    assert not (seeds["train"] & seeds["id"]) and not (seeds["train"] & seeds["ood"]) and not (seeds["id"] & seeds["ood"])
    seed = A.split_seeds("ood", 1, start=3)[0]
    traj = os.path.join(os.path.dirname(A.generate_game("ood", seed, cache_dir=cache)), "traj_data.json")
    assert int(json.load(open(traj))["scene"]["floor_plan"][len("FloorPlan"):]) in A.OOD_SCENES
    with pytest.raises(ValueError):
        A.make_env("test")
    with pytest.raises(ValueError):
        A.cache_root(os.path.join(os.path.dirname(A.__file__), "cache"))


def test_official_layout_is_used_when_present(cache, tmp_path, monkeypatch):
    # a stand-in for $ALFWORLD_DATA/json_2.1.1/valid_seen/<task>/<trial>/ made of generated game folders
    import shutil
    for seed in (0, 1):
        src = os.path.dirname(A.generate_game("train", seed, cache_dir=cache))
        shutil.copytree(src, tmp_path / "json_2.1.1" / "valid_seen" / f"task{seed}" / "trial_T0")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))
    e = A.make_env("id")
    assert e.gamefile_for(1).endswith(os.path.join("task1", "trial_T0", "game.tw-pddl"))
    assert e.reset(3) == A.make_env("train", cache_dir=cache, data="generated").reset(1)  # 3 % 2 games
    with pytest.raises(ValueError):
        A.make_env("ood", data="official")
