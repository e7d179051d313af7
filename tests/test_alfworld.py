"""ALFWorld env: generated and official games played by the real engine (alfworld==0.4.2)."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

import alfworld_env as A
import envs
import search_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = envs.split_seeds("train", 12)   # seed k has task type TASK_TYPES[k % 6]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("alfworld_cache"))


@pytest.fixture(scope="module")
def env(cache):
    return A.make_env("train", cache_dir=cache, data="generated")


def play(env, actions):
    return [env.step(a) for a in actions]


def traj(gamefile):
    return json.load(open(os.path.join(os.path.dirname(gamefile), "traj_data.json")))


def official_tree(root, games, split="valid_seen"):
    """A stand-in for json_2.1.1/<split>/<task>/<trial>/ made of generated game folders; returns the game files."""
    out = []
    for i, g in enumerate(games):
        dst = os.path.join(root, "json_2.1.1", split, f"{traj(g)['task_type']}-{i}", "trial_T0")
        shutil.copytree(os.path.dirname(g), dst)
        out.append(os.path.join(dst, "game.tw-pddl"))
    return out


# --- the protocol -------------------------------------------------------------------------------------------

@pytest.mark.slow   # six games generated and solved (~25 s)
def test_expert_solves_every_task_type(env, cache):
    seen = set()
    for seed in TRAIN[:6]:
        obs = env.reset(seed)
        seen.add(env.task_type)
        assert env.task_type == traj(env.gamefile)["task_type"]
        assert "Your task is to: " in obs and env.task and env.task in obs and env.obs == obs
        assert env.action_hint().startswith("Admissible commands: ") and "go to" in env.action_hint()
        plan = env.expert_plan()
        assert plan, f"expert failed on {env.task_type}"
        for i, a in enumerate(plan):
            obs, r, done, info = env.step(a)
            assert info == {"success": i == len(plan) - 1, "action_is_valid": True}, a
            assert done == (i == len(plan) - 1)
        assert env.success and env.done and r == 1.0 and env.steps == len(plan)
    assert seen == set(A.TASK_TYPES)


def test_protocol_attributes_and_options(env):
    assert env.name == "alfworld" and env.rules == A.RULES and env.max_steps == 50
    assert "move O to R" in env.rules and "put O in/on R" in env.rules and "Nothing happens." in env.rules
    env.reset(TRAIN[0])
    assert (env.steps, env.done, env.success) == (0, False, False) and env.task_type in A.TASK_TYPES
    state = env.get_state()
    assert type(state) is dict and json.loads(json.dumps(state)) == state   # plain data
    with pytest.raises(ValueError, match="unknown alfworld option"):
        A.make_env("train", max_step=10)
    with pytest.raises(ValueError, match="unknown split"):
        A.make_env("test")
    with pytest.raises(ValueError):
        A.cache_root(os.path.join(REPO, "cache"))


def test_set_state_same_as_replay(env, cache):
    rng = np.random.default_rng(0)
    env.reset(TRAIN[3])
    prefix = []
    for _ in range(3):
        prefix.append(env.valid_actions()[rng.integers(len(env.valid_actions()))])
        env.step(prefix[-1])
    snap, adm = pickle.loads(pickle.dumps(env.get_state())), env.valid_actions()
    tail = [env.valid_actions()[rng.integers(len(env.valid_actions()))]]
    first = play(env, tail)
    tail += [env.valid_actions()[0], "not a command", env.valid_actions()[-1]]
    first += play(env, tail[1:])
    env.reset(TRAIN[5])  # elsewhere, then branch back
    env.set_state(snap)
    assert env.render() == snap["obs"] and env.steps == 3 and env.valid_actions() == adm and env.task == snap["task"]
    again = play(env, tail)
    assert [o for o, *_ in again] == [o for o, *_ in first]
    fresh = A.make_env("train", cache_dir=cache, data="generated")
    fresh.reset(TRAIN[3])
    replay = play(fresh, prefix + tail)[3:]
    assert [o for o, *_ in replay] == [o for o, *_ in first]


def test_invalid_and_garbage_are_invalid_steps(env):
    env.reset(TRAIN[0])
    adm, obs0 = env.valid_actions(), env.render()
    for bad in ["fly to the moon", "", "<action>\x00\ud800 ))) go to", "go to nowhere 99", "a" * 5000]:
        obs, r, done, info = env.step(bad)
        assert obs == "Nothing happens." and info == {"success": False, "action_is_valid": False} and r == 0.0
    assert env.steps == 5 and env.valid_actions() == adm and obs0 != env.render()


def test_help_is_not_offered_but_still_played(env):
    """"help" answers the engine's fixed list of command forms: not in valid_actions (which rollout policies draw
    from) nor in the prompt's hint, yet typed it is still an admissible command."""
    env.reset(TRAIN[1])
    assert "help" in env._adm and "help" not in env.valid_actions() and "help" not in env.action_hint().split(", ")
    assert set(env.valid_actions()) == set(env._adm) - {"help"}
    obs, _, _, info = env.step("help")
    assert info["action_is_valid"] and "go to (receptacle)" in obs


def test_future_items_cuts_what_a_receptacle_holds_in_traces(env, cache):
    """future_items=k: a future state lists at most k of a receptacle's contents in every rollout of a tree (the
    simulation score reads futures through the same envs.future_text); the current observation stays whole."""
    obs = "You arrive at countertop 1. On the countertop 1, you see a apple 1, a bread 1, a mug 2, and a pan 3."
    assert envs.cut_lists(obs, 2) == ("You arrive at countertop 1. On the countertop 1, you see a apple 1, "
                                      "a bread 1, and 2 more.")
    assert envs.cut_lists(obs, 4) == obs and envs.cut_lists("In it, you see nothing.", 1) == "In it, you see nothing."
    assert envs.cut_lists("you see a cd 1, and a pen 2. Then", 1) == "you see a cd 1, and 1 more. Then"
    short = A.make_env("train", cache_dir=cache, data="generated", expert="planner", future_items=1)
    assert env.future_items == 0 and short.future_items == 1
    for e in (env, short):
        e.reset(TRAIN[0])
    gos = [a for a in short.valid_actions() if a.startswith("go to ")][:8]
    tree = search_tree.expand(short, b=len(gos), d=1, act=lambda e, rng: gos.pop(), value=lambda e: 0.0,
                              rng=np.random.default_rng(0))
    lists = [o.split("you see ", 1)[1] for r in tree for o in r.observations if "you see" in o]
    assert lists and all(listed.count(", ") <= 1 and ("more." in listed or ", " not in listed) for listed in lists)
    assert any("more." in o for o in lists) and short.render() == env.render()   # the root's obs is whole
    with pytest.raises(ValueError, match="future_items must be an int >= 0"):
        A.make_env("train", future_items=-1)


def test_max_steps_step_after_done_and_similarity(cache):
    e = A.make_env("train", cache_dir=cache, data="generated", max_steps=3)
    e.reset(TRAIN[0])
    outs = play(e, ["x", "look", "y"])
    assert [d for _, _, d, _ in outs] == [False, False, True] and not e.success and e.steps == 3
    assert e.step("look") == envs.after_done(e) and e.steps == 3            # not counted, nothing changes
    assert e.state_similarity("You arrive at Drawer 1.", "you arrive at drawer 1") == 1.0
    assert e.state_similarity("nothing", "You arrive at drawer 1.") == 0.0
    assert 0 < e.state_similarity("On the drawer 1, you see a key.", "On the drawer 2, you see a key.") < 1
    assert not hasattr(A, "token_f1") and not hasattr(A, "split_seeds")     # envs' one copy of each


def test_planner_expert(cache):
    e = A.make_env("train", cache_dir=cache, data="generated", expert="planner")
    e.reset(TRAIN[4])
    e.step(e.valid_actions()[0])
    outs = play(e, e.expert_plan())
    assert all(i["action_is_valid"] for *_, i in outs) and e.success


def test_expert_plans_are_memoised_by_state(cache, monkeypatch):
    """A ReSim tree asks for the expert's plan at its root once per expert rollout and again at each leaf, which
    is the next real state's root: the planner runs once per state (it ran at every ask), same plans."""
    import search_tree
    e = A.make_env("train", cache_dir=cache, data="generated", expert="planner")
    e.reset(TRAIN[4])
    cls, calls = type(e._eng.unwrapped._pddl_state), []
    real = cls.replan
    monkeypatch.setattr(cls, "replan", lambda self, *a: calls.append(1) or real(self, *a))
    plan = e.expert_plan()
    e.expert_plan().append("junk")                                   # a caller's list is its own
    assert e.expert_plan() == plan and len(calls) == 1
    tree = search_tree.expand(e, b=3, d=1, act=search_tree.expert_policy(0.0), value=search_tree.expert_value(0.9),
                              rng=np.random.default_rng(0))
    assert [r.actions for r in tree] == [plan[:1]] and tree[0].value == pytest.approx(0.9 ** (len(plan) - 1))
    e.step(plan[0])
    assert e.expert_plan() == plan[1:] and len(calls) == 2           # the leaf's plan, not a third call
    assert A.AlfWorld._expert_plan(e) == plan[1:]                   # what an unmemoised call returns


def test_generation_deterministic_and_old_games_regenerated(cache, tmp_path):
    a = A.generate_game("train", TRAIN[0], cache_dir=cache)
    stale = tmp_path / "train" / str(TRAIN[0])                      # a game of an older generator
    shutil.copytree(os.path.dirname(a), stale)
    json.dump(dict(traj(a), gen_version=A.GEN_VERSION - 1), open(stale / "traj_data.json", "w"))
    open(stale / "game.tw-pddl", "w").write("{}")
    b = A.generate_game("train", TRAIN[0], cache_dir=str(tmp_path))
    assert open(a).read() == open(b).read() and traj(b)["gen_version"] == A.GEN_VERSION
    other = A.generate_game("train", TRAIN[6], cache_dir=cache)
    assert json.load(open(a))["pddl_problem"] != json.load(open(other))["pddl_problem"]
    assert traj(a)["gen_version"] == A.GEN_VERSION


# --- issue 14: the scene's receptacles, the splits, official data, put ---------------------------------------

def test_kitchen_has_burners_coffee_machine_garbage_can(env):
    for scene in A.scenes("train") + A.scenes("ood"):
        types, recs, _ = A.scene_layout(scene)
        have = Counter(t for t, _ in recs.values())
        assert set(have) == types & A.STATIC, scene                  # every receptacle type the scene lists
        poses = json.load(open(os.path.join(A.PKG, "gen", "layouts", f"FloorPlan{scene}-openable.json")))
        added = [loc for r, (_, loc) in recs.items() if r not in poses]
        assert not set(added) & {recs[r][1] for r in poses} and len(set(added)) == len(added)   # own places
        if A.ROOM[scene] == "Kitchen":
            assert have["StoveBurner"] == 4 and have["CoffeeMachine"] == 1 and have["GarbageCan"] >= 1
    heat = TRAIN[3]                                                  # heat tasks happen in kitchens
    obs = env.reset(heat)
    for name in ("stoveburner 4", "stoveburner 1", "coffeemachine 1", "garbagecan 1", "toaster 1"):
        assert name in obs.split("Your task")[0], name


def test_objects_go_where_alfworld_allows_and_goals_span_the_scene():
    C = A.C
    parents, types = Counter(), Counter()
    for seed in envs.split_seeds("train", 300):
        p = A.sample_problem("train", seed)
        if p is None:
            continue
        types[p["task_type"]] += 1
        assert A.ROOM[p["scene"]] in C.GOALS_VALID[p["task_type"]]
        for o, r in p["objects"].items():
            t, rt = o.split("|")[0], p["rtype"][r]
            assert t in C.VAL_RECEPTACLE_OBJECTS.get(rt, ()) or (t in A.LAMPS and rt in A.LAMP_HOSTS), (t, rt)
        parents[p["params"]["parent_target"]] += 1
    assert set(types) == set(A.TASK_TYPES)
    assert parents["GarbageCan"] + parents["CoffeeMachine"] + parents["StoveBurner"] > 0   # not in -openable.json


def test_ood_scenes_are_valid_unseens_and_never_train_or_id(cache):
    assert set(A.OOD_SCENES) == {10, 219, 308, 424} and set(A.scenes("ood")) == set(A.OOD_SCENES)
    assert A.scenes("train") == A.scenes("id") and not set(A.scenes("train")) & set(A.OOD_SCENES)
    for split in ("train", "id"):
        drawn = {A.sample_problem(split, s, a)["scene"] for s in envs.split_seeds(split, 120) for a in range(2)
                 if A.sample_problem(split, s, a)}
        assert len(drawn) > 40 and not drawn & set(A.OOD_SCENES), split
    drawn = {p["scene"] for s in envs.split_seeds("ood", 60) if (p := A.sample_problem("ood", s))}
    assert drawn == set(A.OOD_SCENES)
    ood = A.generate_game("ood", envs.split_seeds("ood", 1, start=3)[0], cache_dir=cache)
    assert int(traj(ood)["scene"]["floor_plan"][len("FloorPlan"):]) in A.OOD_SCENES


def test_first_env_of_a_process_finds_alfworlds_default_cache(cache, tmp_path):
    # no $ALFWORLD_DATA: alfworld looks in ~/.cache/alfworld; the decoys are what collect_game_files skips
    home = tmp_path / "home"
    games = [A.generate_game("train", s, cache_dir=cache) for s in TRAIN[:2]]
    keep = official_tree(str(home / ".cache" / "alfworld"), games)
    valid = str(home / ".cache" / "alfworld" / "json_2.1.1" / "valid_seen")
    g, t = json.load(open(games[0])), traj(games[0])
    unchecked = {k: v for k, v in g.items() if k != "solvable"}
    for decoy, game, task in [("pick_and_place_with_movable_recep-x", g, t), ("look_at_obj_in_light-Sliced-x", g, t),
                              ("unsolvable", dict(g, solvable=False), t), ("unchecked", unchecked, t),
                              ("other-task", g, dict(t, task_type="pick_and_place_with_movable_recep"))]:
        os.makedirs(os.path.join(valid, decoy, "trial_T0"))
        json.dump(game, open(os.path.join(valid, decoy, "trial_T0", "game.tw-pddl"), "w"))
        json.dump(task, open(os.path.join(valid, decoy, "trial_T0", "traj_data.json"), "w"))
    run = {k: v for k, v in os.environ.items() if k != "ALFWORLD_DATA"}
    run.update(HOME=str(home), DYNAMIND_CACHE=str(tmp_path / "generated"), PYTHONPATH=REPO)
    code = ("import json, alfworld_env as A, envs\n"
            "e = A.make_env('id')\n"
            "first = e.reset(envs.split_seeds('id', 1)[0]) and e.gamefile\n"
            "played = [e.reset(s) and e.gamefile for s in envs.split_seeds('id', len(e.games))]\n"
            "print(json.dumps([first, played, len(A.make_env('id', data='official').games)]))")
    out = subprocess.run([sys.executable, "-c", code], env=run, cwd=str(tmp_path), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, played, n = json.loads(out.stdout.strip().splitlines()[-1])
    assert first == sorted(keep)[0] and played == sorted(keep) and n == 2
    assert not (tmp_path / "generated").exists()                     # no game was generated


def test_put_survives_in_a_game_whose_grammar_uses_it(cache, tmp_path, monkeypatch):
    # the grammar of game files before alfworld 0.4 (what scripts/patch_tw-pddl.py turns into `move`)
    game = official_tree(str(tmp_path), [A.generate_game("train", TRAIN[5], cache_dir=cache)])[0]
    g = json.load(open(game))
    g["grammar"] = g["grammar"].replace("move {o} to {r}", "put {o} in/on {r}").replace(
        "You move the {o.name} to the {r.name}.", "You put the {o.name} in/on the {r.name}.")
    json.dump(g, open(game, "w"))
    monkeypatch.setattr(A, "data_root", lambda: str(tmp_path))
    e = A.make_env("id", data="official")
    assert e.games == [game]
    e.reset(envs.split_seeds("id", 1)[0])
    plan = e.expert_plan()                                          # the expert plays it too
    puts = [a for a in plan if a.startswith("put ")]
    assert plan and len(puts) == 2 and all(" in/on " in a for a in puts) and not any("move " in a for a in plan)
    for a in plan:
        said = "Move " + a[len("put "):].replace(" in/on ", " to ") + "." if a == puts[0] else a   # either form
        obs, r, done, info = e.step(said)
        assert info["action_is_valid"], said
        assert obs.startswith("You put the") == a.startswith("put ")
    assert info["success"] and e.success and done


def test_move_accepted_as_put_and_put_as_move(env):
    assert A.admissible_form("put apple 1 in/on fridge 1", ["move apple 1 to fridge 1"]) == "move apple 1 to fridge 1"
    assert A.admissible_form("put apple 1 on fridge 1", ["put apple 1 in/on fridge 1"]) == "put apple 1 in/on fridge 1"
    assert A.admissible_form("move apple 1 to fridge 1", ["put apple 1 in/on fridge 1"]) == "put apple 1 in/on fridge 1"
    assert A.admissible_form("put apple 1 in/on fridge 1", ["look"]) is None
    env.reset(TRAIN[0])
    plan = env.expert_plan()
    assert plan[-1].startswith("move ")
    play(env, plan[:-1])
    o, t = plan[-1][len("move "):].split(" to ")
    obs, r, done, info = env.step(f"Put {o.title()}  in {t.upper()}.")
    assert info["action_is_valid"] and info["success"] and done


def test_official_data_option(tmp_path, monkeypatch):
    monkeypatch.setattr(A, "data_root", lambda: str(tmp_path))
    with pytest.raises(ValueError, match="no official valid_unseen games"):
        A.make_env("ood", data="official")
    assert A.make_env("ood").games is None                          # auto: generated games


def test_fixes_stay_in_this_module(env):
    env.reset(TRAIN[1])
    env.expert_plan()
    import fast_downward
    from alfworld.agents.expert.handcoded_expert import BasePolicy
    from fast_downward.interface import pddl2sas
    from textworld.envs.pddl import logic
    assert BasePolicy.update_state_tracking.__module__ == "alfworld.agents.expert.handcoded_expert"
    assert fast_downward.pddl2sas is pddl2sas and logic.fast_downward.pddl2sas is pddl2sas


def test_trace_stats_count_detours_leaves_and_first_stop_takes(tmp_path, monkeypatch):
    """bench/alfworld_traces.py reads what the traces teach about searching from the records alone: here one
    detour (the real env went to cabinet 1; the trace chose drawer 1), one leave (at cabinet 1 the trace goes on),
    and a take of the task's object at the second receptacle gone to (not a first-stop take)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import alfworld_traces as T
    prompt = "...\nYour task is to: put some ladle on sinkbasin.\n..."
    done = ["go to cabinet 1", "go to drawer 1", "take ladle 1 from drawer 1", "go to sinkbasin 1"]
    chosen = ["go to drawer 1", "go to drawer 1", "take ladle 1 from drawer 1", "go to sinkbasin 1",
              "move ladle 1 to sinkbasin 1"]
    recs = [dict(kind="resim", seed=3, step=t, prompt=prompt, action=a, prefix=done[:t]) for t, a in enumerate(chosen)]
    recs.insert(2, dict(recs[2], kind="refine"))
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(recs)))
    s = T.stats(T.episodes(str(path)))
    assert s == dict(episodes=1, steps=5, detours=1, takes=1, takes_named=1, first_stop_takes=0, leaves=1,
                     leaves_per_episode=1.0), s


def test_played_counts_games_that_take_the_tasks_object_and_then_use_it(monkeypatch):
    """bench/alfworld_traces.py --evals: of evaluated games, which took anything, which took the task's object, and
    which then wrote a command that puts, heats, cools, cleans or uses (the shuttling agent wrote none)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    import alfworld_traces as T
    task = "put a cool mug in sinkbasin"
    rows = [dict(task=task, success=False, actions=["go to cabinet 1", "take mug 1 from cabinet 1", "go to cabinet 1",
                                                     "go to microwave 1", "go to cabinet 1"]),     # took it, shuttled
            dict(task=task, success=True, actions=["take mug 1 from cabinet 1", "cool mug 1 with fridge 1",
                                                    "move mug 1 to sinkbasin 1"]),
            dict(task=task, success=False, actions=["move spoon 1 to sinkbasin 1", "take spoon 1 from drawer 1",
                                                     "take mug 2 from shelf 1", None]),            # used before
            dict(task=task, success=False, actions=["go to shelf 1"])]
    assert T.played(rows) == dict(games=4, success=1, took=3, took_named=3, acted_after_named=1)


def test_replay_scores_plans_in_a_branch_same_scores_without_a_reset_per_step(cache, monkeypatch):
    """evaluate scores an ALFWorld episode's plans in a second env: the same simulation scores as restoring the
    played env after every plan, without replaying the game from reset at every step (a restore did)."""
    import agent
    import evaluate
    import simrollout
    e = A.make_env("train", cache_dir=cache, data="generated", expert="planner", future_items=3)
    e.reset(TRAIN[4])
    played, turns = ["jump"] + e.expert_plan(), []
    for i, a in enumerate(played):
        actions = played[i:i + 2] if i == 2 else [a]          # one two-action plan: the branch runs ahead
        prev = e.obs
        real = [r for _, r in simrollout.real_futures(e, actions)]
        imagined = [r if (i + j) % 2 == 0 else "you see nothing" for j, r in enumerate(real)]
        text = agent.format_response([agent.Plan(actions, imagined, 0.9)], best=0, action=a)
        turns.append(agent.Turn([1], [1], text, prev, a, a != "jump", False, False))
        e.step(a)
    ep = agent.Episode("alfworld", TRAIN[4], turns, False, 50)
    resets, real_reset = [], A._Pddl.reset
    monkeypatch.setattr(A._Pddl, "reset", lambda self: resets.append(1) or real_reset(self))
    kw = dict(cache_dir=cache, data="generated", expert="planner", future_items=3)
    restored = evaluate.replay(A.make_env("train", **kw), ep)[0]
    n_restored, resets[:] = len(resets), []
    branched = evaluate.replay(A.make_env("train", **kw), ep, branch=A.make_env("train", **kw))[0]
    assert branched == restored and 0 < min(restored) < 1 == max(restored), restored
    assert n_restored >= len(turns) and len(resets) <= 3, (n_restored, len(resets))


def test_explorer_takes_only_what_it_has_seen_and_searches_for_it(cache, monkeypatch):
    """expert="explorer" solves every task type with plans that take (or use) only objects an earlier
    observation showed, and it leaves receptacles that do not hold what it looks for; the planner goes
    straight to the object and never does. Its plan is kept for the states along it (no second play)."""
    plays, real_play = [], A.explorer_plan
    monkeypatch.setattr(A, "explorer_plan", lambda *a: plays.append(1) or real_play(*a))
    leaves, opens = {}, 0
    for expert in ("planner", "explorer"):
        e = A.make_env("train", cache_dir=cache, data="generated", expert=expert)
        leaves[expert] = 0
        for seed in TRAIN[:6]:
            e.reset(seed)
            plays[:], fresh = [], 0
            plan, seen = e.expert_plan(), set(e._seen)
            first = next(i for i, a in enumerate(plan) if A.USES.match(a))
            kind = A.USES.match(plan[first]).group(1).rsplit(" ", 1)[0]
            looked = [a[6:] for i, a in enumerate(plan[:first]) if a.startswith("go to ") and
                      plan[i + 1].startswith("go to ")]           # left again: looked for the object there
            assert all(A.may_hold(r, kind) for r in looked), (seed, kind, plan)
            for i, a in enumerate(plan):
                m = A.USES.match(a)
                assert expert == "planner" or not m or m.group(1) in seen, (seed, a, plan)
                if expert == "explorer" and i:
                    assert e.expert_plan() == plan[i:]
                if expert == "explorer" and a.startswith("open ") and plan[i - 1] == "go to " + a[5:]:
                    # standing at a closed receptacle it went to: a fresh play opens it too, as the kept plan does
                    assert A.AlfWorld._expert_plan(e)[0] == a, (seed, plan[:i + 1])
                    opens, fresh = opens + 1, fresh + 1
                obs, _, _, info = e.step(a)
                assert info["action_is_valid"] and e._seen == seen | A.names(obs), (seed, a)
                seen = set(e._seen)
                leaves[expert] += a.startswith("go to ") and i + 1 < len(plan) and plan[i + 1].startswith("go to ")
            assert e.success, (expert, seed, e.task_type, plan)
            assert len(plays) == (expert == "explorer") + fresh, plays     # no play but the first and ours
    assert leaves["planner"] == 0 and leaves["explorer"] >= 2 and opens >= 1, (leaves, opens)   # 3 before may_hold


def test_the_explorer_looks_only_where_alfred_puts_the_object(cache):
    """may_hold reads alfworld's VAL_RECEPTACLE_OBJECTS (and the lamp hosts). In a 53-receptacle kitchen ("heat some
    apple": 9 places an apple may be) the explorer once looked into every receptacle, ran past its cap of 50
    commands and returned None, 67 s a call, and its ReSim episode searched every step to the step cap."""
    assert A.may_hold("fridge 1", "apple") and A.may_hold("countertop 2", "apple")
    assert not A.may_hold("drawer 3", "apple") and not A.may_hold("fridge 1", "desklamp")
    assert A.may_hold("desk 1", "desklamp") and A.may_hold("sidetable 2", "keychain")
    e = A.make_env("train", cache_dir=cache, data="generated", expert="explorer")
    e.reset(105)
    assert len(e._receptacles[e.gamefile]) == 53 and e.task_type == "pick_heat_then_place_in_recep"
    plan = e.expert_plan()
    assert plan is not None and len(plan) <= e.expert_cap, plan
    take = next(i for i, a in enumerate(plan) if A.USES.match(a))
    assert plan[take].startswith("take apple") and all(
        A.may_hold(a[6:], "apple") for a in plan[:take] if a.startswith("go to ")), plan


def test_seen_names_follow_the_state(env):
    assert A.looked_into("You arrive at drawer 2. The drawer 2 is open. In it, you see a pen 1.") == {"drawer 2"}
    assert A.looked_into("You arrive at desk 1. On the desk 1, you see nothing.") == {"desk 1"}
    assert A.looked_into("You arrive at drawer 2. The drawer 2 is closed.") == set()
    env.reset(TRAIN[0])
    root, first = env.get_state(), env._seen
    for go in [c for c in env.valid_actions() if c.startswith("go to ")]:   # to one that shows an object
        env.set_state(root)
        obs = env.step(go)[0]
        if A.names(obs) - first:
            break
    assert env._seen == first | A.names(obs) and env._seen != first, obs
    assert env._looked == A.looked_into(obs) and env._looked, obs
    env.set_state(root)
    assert env._seen == first and env._looked == frozenset()


def test_inventory_line_is_what_alfworlds_own_inventory_command_says(cache):
    """inventory=True: every observation ends with what the real `inventory` command answers in that state (the
    run that lost its object two steps after taking it: RESULTS.md); the default keeps ALFWorld's text."""
    kw = dict(cache_dir=cache, data="generated", expert="planner")
    e, plain, probe = (A.make_env("train", **kw, inventory=True), A.make_env("train", **kw),
                       A.make_env("train", **kw, inventory=True))
    obs, raw = e.reset(TRAIN[0]), plain.reset(TRAIN[0])
    assert obs == raw + "\nYou are not carrying anything." and e.task == plain.task

    def inventory_says(env):   # the real command, played in a copy of the state
        probe.set_state(env.get_state())
        said = probe._eng.step("inventory")[0].feedback.strip()
        probe.gamefile = None      # the played command is not in probe's ops: make the next set_state replay
        return said

    plan, carried = e.expert_plan(), []
    for a in ["not a command"] + plan:
        obs, raw = e.step(a)[0], plain.step(a)[0]
        assert obs == raw.rstrip() + "\n" + inventory_says(e), (a, obs)
        carried.append(obs.splitlines()[-1])
        if a.startswith("take "):
            held = e.get_state()
    assert any(c.startswith("You are carrying: a ") for c in carried) and e.success
    e.reset(TRAIN[1])   # elsewhere, then back to just after the take: the next step still carries it
    e.set_state(held)
    nxt = plan[[a.startswith("take ") for a in plan].index(True) + 1]
    assert e.step(nxt)[0].splitlines()[-1].startswith("You are carrying: a "), nxt
    with pytest.raises(ValueError, match="inventory"):
        A.make_env("train", inventory="yes")


def test_looked_line_lists_the_receptacles_whose_contents_were_seen(cache):
    """looked=True: every observation ends with the receptacles whose contents an observation so far listed (a
    two-step history forgets where the agent searched, and the explorer's traces choose by it: the 40-episode run
    shuttled between two receptacles in 19 of 24 games); the line follows set_state, changes no plan, and is not
    part of a future state (it made traces longer than the generation budget)."""
    kw = dict(cache_dir=cache, data="generated", expert="explorer")
    e, plain = A.make_env("train", **kw, looked=True), A.make_env("train", **kw)
    opened = biggest = 0
    for seed in (TRAIN[0], TRAIN[3]):     # the explorer opens a fridge and a cabinet in the second
        obs, raw = e.reset(seed), plain.reset(seed)
        assert obs == raw + "\nYou have not looked into anything." and e.task == plain.task
        plan, said, states = e.expert_plan(), set(), []
        assert plan == plain.expert_plan()
        for a in ["not a command"] + plan:
            obs, raw = e.step(a)[0], plain.step(a)[0]
            said |= {m[0] for m in re.findall(r"(?:On the|The) (\w+ \d+)(, you see| is open\. In it)", raw)}
            assert obs.startswith(raw.rstrip()) and obs.count("\n") == raw.rstrip().count("\n") + 1, (a, obs)
            listed = obs.splitlines()[-1].removeprefix("You have looked into: ").rstrip(".").split(", ")
            assert set(listed) == said or (not said and obs.endswith("You have not looked into anything.")), (a, obs)
            assert envs.future_text(e, "", obs) == raw.rstrip(), (a, obs)     # traces do not imagine the line
            states.append((e.get_state(), obs))
        assert e.success, plan
        opened, biggest = opened + any(a.startswith("open ") for a in plan), max(biggest, len(said))
    assert opened and biggest >= 2, (opened, biggest)
    e.set_state(states[1][0])
    assert e.render() == states[1][1] and e.step(plan[1])[0] == states[2][1]
    assert A.looked_line({"drawer 10", "drawer 2", "cabinet 1"}) == \
        "You have looked into: cabinet 1, drawer 2, drawer 10."
    with pytest.raises(ValueError, match="looked"):
        A.make_env("train", looked="yes")


def test_admits_is_what_step_calls_valid(env):
    """agent.admit trusts admits(action) to say what step would do, for every spelling step accepts."""
    env.reset(TRAIN[0])
    plan = env.expert_plan()
    for a in ["fly to the moon", "", "go to nowhere 99", plan[0], plan[0].upper() + ".", "  " + plan[0]]:
        want = env.admits(a)
        env.reset(TRAIN[0])
        assert env.step(a)[3]["action_is_valid"] == want
    assert env.admits(plan[0]) and not env.admits("go to nowhere 99")
