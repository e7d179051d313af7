import pickle
import random

import numpy as np
import pytest

import sokoban as S
from envs import split_seeds
from sokoban import Sokoban, make_env, solve


def lvl(text, **kw):
    return Sokoban.from_xsb(text.strip("\n"), **kw)


# --- rules ---------------------------------------------------------------------------------

def test_move_and_push():
    env = lvl("#######\n#@ $ .#\n#######")
    obs, r, done, info = env.step("Right")
    assert obs == "#######\n#_PX_O#\n#######"
    assert r == pytest.approx(-0.1) and not done
    assert info == {"success": False, "action_is_valid": True}        # exactly the protocol's keys
    obs, r, done, info = env.step("Right")                    # push
    assert obs == "#######\n#__PXO#\n#######" and r == pytest.approx(-0.1)
    assert env.room_state[1, 4] == 4 and env.room_state[1, 3] == 5 and env.player_position == (1, 3)


def test_push_into_wall_and_box_into_box():
    env = lvl("#####\n#@$.#\n# $.#\n#####")
    env.step("Down")                                          # (2,1) is floor
    before = env.render()
    obs, r, done, info = env.step("Down")                     # wall below player
    assert obs == before and info["action_is_valid"]
    env2 = lvl("######\n#@$$.#\n#  ..#\n# $  #\n######")
    state = env2.room_state.copy()
    _, r, _, info = env2.step("Right")                        # a box never pushes a box
    assert (env2.room_state == state).all() and r == pytest.approx(-0.1)
    env3 = lvl("####\n#@$#\n#. #\n####")
    _, _, _, info = env3.step("right")                        # box against wall
    assert env3.player_position == (1, 1)


def test_box_on_and_off_target_rewards_and_S():
    env = lvl("########\n#@$. $.#\n########")
    obs, r, done, info = env.step("Right")
    assert r == pytest.approx(0.9) and not done and obs == "########\n#_P√_XO#\n########"
    obs, r, done, info = env.step("Right")                    # box leaves the target, player on it
    assert r == pytest.approx(-1.1) and obs == "########\n#__SXXO#\n########"
    assert env.room_state[1, 3] == 5 and env.room_fixed[1, 3] == 2


def test_finish_gives_10_and_done():
    env = lvl("#####\n#@$.#\n#####")
    obs, r, done, info = env.step("Right")
    assert r == pytest.approx(10.9) and done and info["success"] and env.success and env.done
    assert obs == "#####\n#_P√#\n#####"
    obs2, r2, done2, info2 = env.step("Left")                 # after the end: no change, no reward, not counted
    assert obs2 == obs and r2 == 0.0 and done2 and env.steps == 1
    assert info2 == {"success": True, "action_is_valid": False}


def test_max_steps_done_and_invalid_action():
    env = lvl("######\n#@ $.#\n######", max_steps=3)
    start = env.render()
    for i, a in enumerate(["jump", None, "Up  Down"]):
        obs, r, done, info = env.step(a)
        assert obs == start and r == pytest.approx(-0.1) and not info["action_is_valid"]
        assert env.steps == i + 1
    assert done and not env.success and not info["success"]
    env = lvl("######\n#@ $.#\n######")
    obs, _, _, info = env.step("  rIGHT \n")                  # case and surrounding whitespace
    assert info["action_is_valid"] and obs == "######\n#_P$O#\n######".replace("$", "X")


def _gym_step(fixed, state, pos, bot, action, n_boxes):
    """gym-sokoban 0.0.6 SokobanEnv._push/_move/_calc_reward, transcribed (action 1..4)."""
    change = np.array([(-1, 0), (1, 0), (0, -1), (0, 1)][action - 1])
    new, newbox = pos + change, pos + 2 * change
    if state[tuple(new)] in (3, 4) and state[tuple(newbox)] in (1, 2):
        state[tuple(new)] = 5
        state[tuple(pos)] = fixed[tuple(pos)]
        state[tuple(newbox)] = 3 if fixed[tuple(newbox)] == 2 else 4
        pos = new
    elif state[tuple(new)] in (1, 2):
        state[tuple(new)] = 5
        state[tuple(pos)] = fixed[tuple(pos)]
        pos = new
    reward = -0.1
    cur = n_boxes - int(((state == 2) | ((fixed == 2) & (state == 5))).sum())
    if cur > bot:
        reward += 1
    elif cur < bot:
        reward += -1
    won = int(((state == 2) | ((fixed == 2) & (state == 5))).sum()) == 0
    if won:
        reward += 10
    return pos, cur, reward, won


def test_steps_match_gym_transcription():
    rnd = random.Random(0)
    for seed in range(30):
        env = make_env("ood" if seed % 2 else "id", max_steps=1000)
        env.reset(seed)
        fixed, state = env.room_fixed.copy(), env.room_state.copy()
        pos, bot = np.argwhere(state == 5)[0], 0
        for _ in range(200):
            a = rnd.randint(1, 4)
            pos, bot, g_r, won = _gym_step(fixed, state, pos, bot, a, env.num_boxes)
            _, r, done, _ = env.step(S.ACTIONS[a - 1])
            assert r == g_r and (env.room_state == state).all() and done == won
            if done:
                break


# --- text, state, determinism ----------------------------------------------------------------

def test_render_all_seven_symbols():
    a = lvl("#######\n#@ $.*#\n#######").render()
    b = lvl("#####\n#+$ #\n#   #\n#####").render()
    assert a == "#######\n#P_XO√#\n#######"
    assert b == "#####\n#SX_#\n#___#\n#####"
    assert set(a + b) - {"\n"} == set("#_OX√PS")


def test_seed_determinism_and_variety():
    e1, e2 = make_env("id"), make_env("id")
    assert e1.reset(123) == e2.reset(123)
    assert (e1.room_state == e2.room_state).all()
    assert len({e1.reset(s) for s in range(20)}) > 10
    e1.step("Up")
    assert e1.reset(123) == e2.render() and e1.steps == 0


def test_generated_room_is_gym_like():
    for split, size, nb in [("id", 6, 1), ("ood", 8, 2)]:
        env = make_env(split)
        for seed in split_seeds(split, 10):
            env.reset(seed)
            rs, rf = env.room_state, env.room_fixed
            assert rs.shape == rf.shape == (size, size)
            assert (rs[0] == 0).all() and (rs[-1] == 0).all() and (rs[:, 0] == 0).all() and (rs[:, -1] == 0).all()
            assert (rs == 4).sum() == nb and (rf == 2).sum() == nb and (rs == 5).sum() == 1
            assert (rs == 3).sum() == 0 and (rs == 2).sum() == nb   # gym: no box or player on a target
            assert set(np.unique(rf)) <= {0, 1, 2}


def test_set_state_round_trip():
    env = make_env("ood", max_steps=100)
    env.reset(7)
    rnd = random.Random(1)
    for a in rnd.choices(S.ACTIONS, k=5):
        env.step(a)
    snap = env.get_state()
    acts = rnd.choices(S.ACTIONS + ("bad",), k=30)
    run1 = [env.step(a)[:3] for a in acts]
    arr1 = env.room_state.copy()
    env.set_state(snap)
    run2 = [env.step(a)[:3] for a in acts]
    assert run1 == run2 and (env.room_state == arr1).all()
    other = make_env("ood")                                    # restore into another env, via pickle
    other.reset(99)
    other.set_state(pickle.loads(pickle.dumps(snap)))
    assert other.render() == snap["obs"] and [other.step(a)[:3] for a in acts] == run1
    env.set_state(snap)                                        # snapshot unaffected by later steps
    assert env.render() == snap["obs"] and env.steps == snap["steps"] and isinstance(snap, dict)


def test_state_similarity_and_protocol_bits():
    env = make_env("id")
    env.reset(0)
    obs = env.render()
    assert env.state_similarity(obs, obs) == 1.0
    assert env.state_similarity("\n" + obs.replace("\n", "  \n") + "  \n\n", obs) == 1.0
    assert env.state_similarity(obs.replace("P", "_", 1), obs) == 0.0
    assert env.state_similarity(None, obs) == 0.0
    assert env.valid_actions() == ["Up", "Down", "Left", "Right"]
    assert env.action_hint() == "" and env.task == "" and env.name == "sokoban"
    assert isinstance(S.RULES, str) and "√" in S.RULES and "Up" in S.RULES


# --- XSB ----------------------------------------------------------------------------------

def test_xsb_round_trip_and_reset():
    text = "#######\n#  .  #\n# $*$ #\n#. @  #\n#######"
    env = Sokoban.from_xsb(text)
    assert env.to_xsb() == text
    env.step("Up")
    assert env.to_xsb() != text
    assert env.reset(5) == Sokoban.from_xsb(text).render() and env.to_xsb() == text
    g = make_env("ood")
    g.reset(3)
    back = Sokoban.from_xsb(g.to_xsb())
    assert (back.room_fixed == g.room_fixed).all() and (back.room_state == g.room_state).all()


def test_xsb_exterior_and_open_levels():
    env = Sokoban.from_xsb("  ####\n###  #\n#@$ .#\n######")       # ragged, space outside the walls
    assert env.render().split("\n")[0] == "######" and env.room_state.shape == (4, 6)
    env = Sokoban.from_xsb("@$.")                                    # no walls: a ring is added
    assert env.render() == "#####\n#PXO#\n#####"
    assert Sokoban.from_xsb("-@$._").render() == "#######\n#_PXO_#\n#######"


@pytest.mark.parametrize("text,match", [
    ("", "empty"), ("  \n\n", "empty"),
    ("####\n#$.#\n####", "no player"),
    ("#####\n#@$.#\n# @ #\n#####", "line 3, column 3"),
    ("#####\n#@$$#\n#. #\n#####", "2 boxes but 1 goals"),
    ("#####\n#@$.#\n#x  #\n#####", "line 3, column 2"),
    ("#####\n#@ .#\n#####", "no boxes"),
])
def test_malformed_xsb(text, match):
    with pytest.raises(ValueError, match=match):
        Sokoban.from_xsb(text)


# --- solver and generator -------------------------------------------------------------------

@pytest.mark.parametrize("text,n", [
    ("#####\n#@$.#\n#####", 1),
    ("#######\n#@ $ .#\n#######", 3),
    ("######\n#.$ @#\n######", 2),
    ("#####\n#@  #\n# $ #\n# . #\n#####", 2),
    ("######\n#@$. #\n# $. #\n######", 4),
    ("######\n#    #\n# $  #\n#@  .#\n######", 6),
])
def test_solver_optimal_on_hand_levels(text, n):
    env = Sokoban.from_xsb(text)
    before = env.get_state()
    plan = solve(env)
    assert plan is not None and len(plan) == n
    after = env.get_state()
    assert {k: v for k, v in after.items() if k != "fixed"} == {k: v for k, v in before.items() if k != "fixed"}
    for a in plan:
        env.step(a)
    assert env.success


def _bfs_len(env, limit=40):
    """Independent BFS through env.step (no pruning): optimal length or None."""
    start = env.get_state()
    seen, frontier = {start["obs"]}, [start]
    for depth in range(1, limit + 1):
        nxt = []
        for st in frontier:
            for a in S.ACTIONS:
                env.set_state(st)
                env.step(a)
                if env.success:
                    env.set_state(start)
                    return depth
                if env.obs not in seen:
                    seen.add(env.obs)
                    nxt.append(env.get_state())
        frontier = nxt
    env.set_state(start)
    return None


def test_solver_matches_plain_bfs_on_generated_rooms():
    for seed in range(25):
        env = make_env("id", max_steps=1000)
        env.reset(seed)
        plan = solve(env)
        assert len(plan) == env.solution_length == _bfs_len(env)


def test_solver_unsolvable_and_cap():
    assert solve(Sokoban.from_xsb("#####\n#$ .#\n#@  #\n#####")) is None    # box in a corner
    assert solve(Sokoban.from_xsb("######\n#@ $ #\n#   .#\n######")) is None  # box stuck on top wall
    env = make_env("ood")
    env.reset(0)
    assert S.solve(env, max_states=5) is None


def test_generator_length_filter():
    env = make_env("id", min_solution=5, max_solution=6)
    for seed in split_seeds("id", 15):
        env.reset(seed)
        assert 5 <= env.solution_length <= 6 and 5 <= len(env.expert_plan()) <= 6
    env = make_env("id", min_solution=60, max_solution=70, max_attempts=5)
    with pytest.raises(RuntimeError, match="after 5 attempts"):
        env.reset(0)


def test_splits():
    sets = {s: set(split_seeds(s, 5000)) for s in ("train", "id", "ood")}
    assert all(len(v) == 5000 for v in sets.values())
    assert not (sets["train"] & sets["id"]) and not (sets["train"] & sets["ood"]) and not (sets["id"] & sets["ood"])
    assert split_seeds("id", 3, start=10) == [1_000_010, 1_000_011, 1_000_012]
    assert not set(split_seeds("train", 10, start=999_990)) & set(split_seeds("id", 10))
    with pytest.raises(ValueError):
        split_seeds("train", 10, start=999_995)
    with pytest.raises(ValueError):
        make_env("test")
    with pytest.raises(ValueError, match="unknown sokoban option"):
        make_env("id", colour="red")
    e = make_env("ood")
    assert e.dim == (8, 8) and e.num_boxes == 2 and e.max_steps == 30
    assert make_env("id", max_steps=7).max_solution == 7


def test_a_room_mixture_picks_the_room_by_seed():
    env = make_env("train", rooms=[[6, 6, 1], [7, 7, 2]], max_steps=30)
    for seed in range(6):
        obs = env.reset(seed)
        h, w, boxes = [(6, 6, 1), (7, 7, 2)][seed % 2]
        lines = obs.split("\n")
        assert len(lines) == h and all(len(x) == w for x in lines) and env.num_boxes == boxes
        assert sum(c in "X√" for c in obs) == boxes and env.solution_length <= 30
    with pytest.raises(ValueError, match="rooms"):
        make_env("train", rooms=[[6, 6]])


def test_train_rooms_change_the_train_split_only():
    mix = [[8, 8, 1], [7, 7, 2]]
    train = make_env("train", train_rooms=mix)
    assert len(train.reset(0).split("\n")) == 8 and len(train.reset(1).split("\n")) == 7
    held_out = make_env("id", train_rooms=mix)                 # ID stays 6x6 with one box
    obs = held_out.reset(split_seeds("id", 1)[0])
    assert len(obs.split("\n")) == 6 and held_out.num_boxes == 1
