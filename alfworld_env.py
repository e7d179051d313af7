"""ALFWorld (text) for Dyna-Mind: the real TextWorld/PDDL engine of alfworld==0.4.2, on official or generated games.

Official games are played wherever alfworld finds them ($ALFWORLD_DATA, else ~/.cache/alfworld: alfworld/info.py
decides when alfworld is imported, which this module does first): train -> train (3,553), id -> valid_seen (140),
ood -> valid_unseen (134), filtered as AlfredTWEnv.collect_game_files does. `len(env.games)` says how many;
envs.split_seeds(split, len(env.games)) plays each once; data="official" insists on them.

Otherwise `generate_game` builds ALFWorld games from what the wheel ships (scene layouts, affordances, the PDDL
domain, grammar and goal library): one per (split, seed), kept only if ALFWorld's hand-coded expert wins it.
OOD = valid_unseen's scenes (FloorPlan10, 219, 308, 424), never trained on; train and ID share the other 116.

Branching (get_state/set_state) replays the command prefix from reset: the engine state lives inside
fast-downward's C library and cannot be copied. PDDL->SAS translation is memoised, so a replay costs one SAS
load plus about one engine step per command (bench/bench_alfworld.py).
"""
import functools
import json
import os
import random
import re
import shutil
import sys
from collections import Counter
from contextlib import contextmanager
from types import SimpleNamespace

import alfworld.gen.constants as C
import alfworld.gen.goal_library as G
import alfworld.info
import fast_downward
import numpy as np
import textworld
from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
from fast_downward.interface import pddl2sas
from textworld.envs import PddlEnv

import envs

RULES = """You are an agent in a household (ALFWorld, text only). Each turn you get an observation and the
admissible commands; reply with exactly one command. Commands:
  go to R | open R | close R | take O from R | move O to R | examine X | use L | look | inventory | help
  heat O with microwave N | cool O with fridge N | clean O with sinkbasin N
Objects and receptacles are named with a number ("apple 1", "countertop 2"). You hold at most one object.
A closed receptacle must be opened to see, take or place what is inside; heating, cooling and cleaning only
need you at the appliance, holding the object. "use" switches a lamp on (look at an object under it by
holding the object there). Older game files say "put O in/on R" for "move O to R"; either form is accepted
where the other is admissible. Anything else changes nothing and the observation is "Nothing happens."."""

TASK_TYPES = ["pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"]
GEN_VERSION = 2   # bump when generated games change: cached games of another version are regenerated
OOD_SCENES = (10, 219, 308, 424)   # valid_unseen's scenes (ALFRED's unseen rooms), one per room type
OFFICIAL_DIRS = {"train": "train", "id": "valid_seen", "ood": "valid_unseen"}
PLAN_MEMO = 4096                  # expert plans remembered per env (cleared when full)
OPTIONS = ("max_steps", "cache_dir", "data", "expert", "expert_cap", "future_items", "inventory", "looked")
GEN_STATS = Counter()   # generated / rejected games of this process (the retry counter)

# Receptacle types -openable.json leaves out get one each, stoves four burners, placed next to what they stand
# by (a burner by the counter); floor-standing ones low.
EXTRA_COUNT = {"StoveBurner": 4}
NEXT_TO = {"StoveBurner": "CounterTop", "CoffeeMachine": "CounterTop", "Toaster": "CounterTop",
           "HandTowelHolder": "SinkBasin", "ToiletPaperHanger": "Toilet", "TowelHolder": "BathtubBasin"}
ON_FLOOR = {"GarbageCan", "LaundryHamper", "Toilet", "Bed", "Sofa", "ArmChair", "Ottoman", "Cart", "BathtubBasin"}
LAMPS = ["DeskLamp", "FloorLamp"]
LAMP_HOSTS = {"SideTable", "Desk", "Dresser", "CoffeeTable", "TVStand", "Shelf", "DiningTable"}
PKG = os.path.dirname(os.path.abspath(alfworld.info.__file__))
STATIC = set(C.RECEPTACLES) - set(C.MOVABLE_RECEPTACLES)   # receptacles; movable ones (mug, pan) are objects
TASK_NEEDS = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),  # affordance, appliance
              "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
              "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}


ROOM = {s: room for room, nums in C.SCENE_TYPE.items() for s in nums}   # FloorPlan number -> room type


def scenes(split):
    """The FloorPlan numbers a split's generated games use: OOD's four, or all the others."""
    envs.check_split(split)
    return [s for s in ROOM if (s in OOD_SCENES) == (split == "ood")]


def _pddl_name(s):
    # ALFWorld's mangling (PlannedGameState.fix_pddl_str_chars), all at once so "#"->"-" is not re-mangled.
    table = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return re.sub(r"[-#|+.,]", lambda m: table[m.group(0)], s)


def cache_root(cache_dir=None):
    """Where generated games are cached: cache_dir, else $DYNAMIND_CACHE/alfworld, else ~/.cache/dynamind/alfworld;
    never inside the repository."""
    root = os.path.abspath(cache_dir or os.path.join(os.environ.get("DYNAMIND_CACHE") or
                                                     os.path.expanduser("~/.cache/dynamind"), "alfworld"))
    repo = os.path.dirname(os.path.abspath(__file__))
    if os.path.commonpath([root, repo]) == repo:
        raise ValueError(f"ALFWorld cache {root} is inside the repository; set DYNAMIND_CACHE elsewhere")
    return root


# ----------------------------------------------------------------------------- scenes
def _recep_type(rid):
    parts = rid.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


def _loc(x, z, rot, hor):
    return f"loc|{int(round(x / 0.25))}|{int(round(z / 0.25))}|{int(rot) // 90 % 4}|{int(hor)}"


@functools.lru_cache(maxsize=None)
def scene_layout(scene):
    """(types -objects.json lists, {receptacle id: (type, location)}, free floor points) of a FloorPlan, the same
    for every game of the scene. Receptacles: every point of -openable.json (ALFRED's receptacle poses, which
    leave out stoves, coffee machines, toasters, most garbage cans and towel holders), then one of each other
    static receptacle type the scene lists (EXTRA_COUNT of some), at free floor points next to what they
    stand by, facing them."""
    lay = os.path.join(PKG, "gen", "layouts", f"FloorPlan{scene}")
    types = set(json.load(open(lay + "-objects.json")))
    poses = json.load(open(lay + "-openable.json"))
    recs = {r: (_recep_type(r), _loc(*poses[r])) for r in sorted(poses)}
    where = {_recep_type(r): tuple(poses[r][:2]) for r in sorted(poses, reverse=True)}   # a point per type
    free = [(round(x, 2), round(z, 2)) for x, z in np.load(lay + "-layout.npy").tolist()]
    free = [p for p in free if p not in {(round(x, 2), round(z, 2)) for x, z, *_ in poses.values()}]
    rng = np.random.default_rng(scene)
    for t in sorted(types & STATIC - set(where), key=lambda t: (t in NEXT_TO, t)):   # anchors first
        at = where.get(NEXT_TO.get(t)) or free[int(rng.integers(len(free)))]
        near = sorted(free, key=lambda p: ((p[0] - at[0]) ** 2 + (p[1] - at[1]) ** 2, p))[:EXTRA_COUNT.get(t, 1)]
        where[t] = near[0]
        for x, z in near:
            free.remove((x, z))
            for rot in 90 * rng.permutation(4):   # it stands 0.5 m in front of the agent, ids unique
                rx, rz = x + 0.5 * np.sin(np.radians(rot)), z + 0.5 * np.cos(np.radians(rot))
                pos = f"{rx:+06.2f}|{0.0 if t in ON_FLOOR else 0.9:+06.2f}|{rz:+06.2f}"
                rid = f"{t[:-5]}|{pos}|{t}" if t.endswith("Basin") else f"{t}|{pos}"
                if rid not in recs:
                    recs[rid] = (t, _loc(x, z, rot, 0 if t in ON_FLOOR else 30))
                    break
    return frozenset(types), recs, tuple(free)


# ----------------------------------------------------------------------------- games
def sample_problem(split, seed, attempt=0):
    """One candidate game of (split, seed) as plain data, or None if the drawn scene cannot host its task.
    Task type = TASK_TYPES[k % 6] for the k-th seed of the split; the scene is drawn among the split's scenes
    of a room type ALFRED allows for that task (constants.GOALS_VALID)."""
    task_type = TASK_TYPES[seed % envs.SPLIT_SIZE % len(TASK_TYPES)]
    rng = np.random.default_rng([seed, envs.SPLITS.index(split), attempt])
    pool = [s for s in scenes(split) if ROOM[s] in C.GOALS_VALID[task_type]]
    scene = pool[int(rng.integers(len(pool)))]
    types, recs, free = scene_layout(scene)
    rtype = {r: t for r, (t, _) in recs.items()}
    objects, lamps = _place_objects(types, rtype, rng)
    params = _pick_task(task_type, objects, lamps, rtype, rng)
    if params is None:
        return None
    x, z = free[int(rng.integers(len(free)))]
    tpl = G.gdict[task_type]["templates"]
    desc = tpl[int(rng.integers(len(tpl)))].format(obj=params["object_target"].lower(), mrecep="",
                                                    recep=params["parent_target"].lower(),
                                                    toggle=params["toggle_target"].lower())
    return dict(task_type=task_type, scene=scene, params=params, rtype=rtype, desc=desc,
                rloc={r: loc for r, (_, loc) in recs.items()}, objects={**objects, **lamps},
                start=_loc(x, z, 90 * int(rng.integers(4)), 30))


def _place_objects(types, rtype, rng):
    """1-3 of each pickable type the scene lists (ALFRED's MAX_NUM_OF_OBJ_INSTANCES), each in a receptacle its
    type may go in (alfworld's VAL_RECEPTACLE_OBJECTS); lamps on furniture."""
    val = C.VAL_RECEPTACLE_OBJECTS
    pickable = set().union(*val.values())
    oid = lambda t: t + "".join(f"|{v:+06.2f}" for v in rng.uniform(-3, 3, 3))   # ALFRED's ids: type|x|y|z
    placed, lamps = {}, {}
    for t in sorted(t for t in types if t in pickable and t in C.OBJECTS and "Sliced" not in t):
        hosts = [r for r in rtype if t in val.get(rtype[r], ())]
        for _ in range(int(rng.integers(1, C.MAX_NUM_OF_OBJ_INSTANCES + 1)) if hosts else 0):
            placed[oid(t)] = hosts[int(rng.integers(len(hosts)))]
    for t in [t for t in LAMPS if t in types]:
        hosts = [r for r in rtype if rtype[r] in LAMP_HOSTS]
        if hosts:
            lamps[oid(t)] = hosts[int(rng.integers(len(hosts)))]
    return placed, lamps


def _pick_task(task_type, placed, lamps, rtype, rng):
    """Goal parameters the scene can host (objects, appliance, a receptacle that may take the object and does
    not hold one yet, so the goal is not met at the start), or None."""
    types = [o.split("|")[0] for o in placed]
    rtypes = sorted(set(rtype.values()))
    need = TASK_NEEDS.get(task_type)   # (affordance, appliance)
    cands = []
    for t in sorted(set(types)):
        if (task_type == "pick_two_obj_and_place" and types.count(t) < 2) or (
                need and (t not in C.VAL_ACTION_OBJECTS[need[0]] or need[1] not in rtypes)):
            continue
        if task_type == "look_at_obj_in_light":
            cands += [(t, "", lamp.split("|")[0]) for lamp in sorted(lamps)]
            continue
        held = {rtype[r] for o, r in placed.items() if o.split("|")[0] == t}
        cands += [(t, r, "") for r in rtypes if t in C.VAL_RECEPTACLE_OBJECTS.get(r, ()) and r not in held
                  and (not need or r != need[1])]
    if not cands:
        return None
    obj, parent, toggle = cands[int(rng.integers(len(cands)))]
    return dict(object_target=obj, parent_target=parent, toggle_target=toggle, mrecep_target="", object_sliced=False)


def problem_pddl(p):
    """The problem PDDL text in ALFWorld's layout (ids mangled as ALFWorld does)."""
    static = sorted(STATIC)
    otypes = sorted(C.OBJECTS_SET - STATIC)
    locs = sorted(set(p["rloc"].values()) | {p["start"]})
    A = C.VAL_ACTION_OBJECTS
    decl = (["agent1 # agent"] + [f"{t}Type # otype" for t in otypes] + [f"{t}Type # rtype" for t in static]
            + [f"{o} # object" for o in sorted(p["objects"])] + [f"{r} # receptacle" for r in p["rtype"]]
            + [f"{l} # location" for l in locs])
    init = [f"(atLocation agent1 {p['start']})"]
    for r, t in p["rtype"].items():
        init += [f"(receptacleType {r} {t}Type)", f"(receptacleAtLocation {r} {p['rloc'][r]})"]
        init += [f"(openable {r})"] if t in C.OPENABLE_CLASS_SET else []
    for rt in sorted(set(p["rtype"].values())):   # without canContain the translator finds no plan ('val1')
        init += [f"(canContain {rt}Type {ot}Type)" for ot in sorted(C.VAL_RECEPTACLE_OBJECTS.get(rt, ()))
                 if ot in otypes]
    for o, r in sorted(p["objects"].items()):
        t = o.split("|")[0]
        init += [f"(objectType {o} {t}Type)", f"(inReceptacle {o} {r})", f"(objectAtLocation {o} {p['rloc'][r]})"]
        if t in LAMPS:
            init.append(f"(toggleable {o})")
            continue
        init.append(f"(pickupable {o})")
        init += [f"(cleanable {o})"] * (t in A["Cleanable"]) + [f"(heatable {o})"] * (t in A["Heatable"])
        init += [f"(coolable {o})"] * (t in A["Coolable"]) + [f"(sliceable {o})"] * (t in A["Sliceable"])
        init += [f"(isReceptacleObject {o})"] * (t in C.MOVABLE_RECEPTACLES_SET)
        init += [f"(isCool {o})"] * (p["rtype"][r] == "Fridge")  # ALFRED: things in the fridge are cold
    q = p["params"]
    goal = G.gdict[p["task_type"]]["pddl"].format(obj=q["object_target"], recep=q["parent_target"],
                                                  toggle=q["toggle_target"], mrecep="")
    body = ("(define (problem plan_dynamind)\n(:domain alfred)\n(:objects\n    "
            + "\n    ".join(decl) + "\n)\n(:init\n    " + "\n    ".join(init) + "\n)\n")
    return _pddl_name(body) + _pddl_name(goal.strip()) + "\n"


def write_game(folder, p, walkthrough=None):
    """The three files ALFWorld plays: game.tw-pddl, traj_data.json (the expert reads it), initial_state.pddl."""
    os.makedirs(folder, exist_ok=True)
    pddl = problem_pddl(p)
    grammar = open(os.path.join(PKG, "data", "alfred.twl2")).read().replace("UNKNOWN GOAL", p["desc"])
    game = dict(pddl_domain=open(os.path.join(PKG, "data", "alfred.pddl")).read(), grammar=grammar,
                pddl_problem=pddl, solvable=walkthrough is not None, walkthrough=walkthrough)
    traj = dict(task_type=p["task_type"], pddl_params=p["params"], scene=dict(floor_plan=f"FloorPlan{p['scene']}"),
                turk_annotations=dict(anns=[dict(task_desc=p["desc"])]), gen_version=GEN_VERSION)
    open(os.path.join(folder, "initial_state.pddl"), "w").write(pddl)
    json.dump(traj, open(os.path.join(folder, "traj_data.json"), "w"))
    json.dump(game, open(os.path.join(folder, "game.tw-pddl"), "w"))
    return os.path.join(folder, "game.tw-pddl")


def generate_game(split, seed, cache_dir=None, max_tries=50, expert_cap=50):
    """Path of game.tw-pddl for (split, seed), generating and caching it on first use. A candidate is kept only
    if the engine loads it and ALFWorld's hand-coded expert wins within `expert_cap` steps (its actions are the
    walkthrough); otherwise the next attempt of the same seed is drawn (GEN_STATS counts rejections)."""
    envs.check_split(split)
    folder = os.path.join(cache_root(cache_dir), split, str(seed))
    path = os.path.join(folder, "game.tw-pddl")
    if _version(folder) == GEN_VERSION:
        return path
    tmp = f"{folder}.tmp{os.getpid()}"
    for attempt in range(max_tries):
        p = sample_problem(split, seed, attempt)
        if p is None:
            GEN_STATS["no_task_in_scene"] += 1
            continue
        walk = _expert_play(_engine(expert=True), write_game(tmp, p), (), seed * 1000 + attempt, expert_cap)
        if walk is None:
            GEN_STATS["rejected_by_engine"] += 1
            continue
        write_game(tmp, p, walkthrough=walk)
        if os.path.isdir(folder):   # a game of an older generator
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)  # atomic: a concurrent generator of the same seed writes the same game
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        GEN_STATS["generated"] += 1
        return path
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"no ALFWorld game for split={split} seed={seed} after {max_tries} tries")


def _version(folder):
    try:   # a game folder is renamed into place whole, so a readable version means a complete game
        return json.load(open(os.path.join(folder, "traj_data.json"))).get("gen_version")
    except (OSError, ValueError):
        return None


def _expert_play(eng, gamefile, played, seed, cap):
    """The hand-coded expert's commands, after `played`, until the goal holds; None if it fails within `cap`."""
    try:
        with _seeded(seed):
            eng.load(gamefile)
            st = eng.reset()
            for c in played:
                st, _, _ = eng.step(c)
            plan = []
            while not st["won"] and len(plan) < cap:
                plan.append(st["extra.expert_plan"][0])
                st, _, _ = eng.step(plan[-1])
        return plan if st["won"] else None
    except Exception:  # the engine rejects the problem (translator error), the expert times out, ...
        return None


NAME = re.compile(r"\b([a-z]+ \d+)\b")
LOOKED = re.compile(r"(?:On the|The) ([a-z]+ \d+)(?:, you see| is open\. In it, you see)", re.I)
USES = re.compile(r"^(?:take|use) ([a-z]+ \d+)")
HOLDS = {r.lower(): {o.lower() for o in objs} for r, objs in C.VAL_RECEPTACLE_OBJECTS.items()}
HOLDS_LAMP = {r.lower() for r in LAMP_HOSTS}
LAMP_KINDS = {t.lower() for t in LAMPS}


def may_hold(receptacle, kind):
    """Whether ALFRED puts an object of `kind` ("apple") in a receptacle like "fridge 1" (VAL_RECEPTACLE_OBJECTS;
    lamps stand on LAMP_HOSTS): where a person who knows kitchens would look, and where the generated games
    place objects."""
    rtype = receptacle.rsplit(" ", 1)[0]
    return kind in HOLDS.get(rtype, ()) or (kind in LAMP_KINDS and rtype in HOLDS_LAMP)


def names(text):
    """The object and receptacle names an observation shows ("apple 1", "countertop 2")."""
    return set(NAME.findall(text.lower()))


def looked_into(text):
    """The receptacles whose contents an observation lists ("On the desk 1, you see ...", "The drawer 2 is
    open. In it, you see ..."); a closed one ("The drawer 2 is closed.") is not looked into."""
    return {r.lower() for r in LOOKED.findall(text)}


def explorer_plan(eng, state, receptacles, cap):
    """A searching expert, played out in the scratch engine `eng` from `state` (AlfWorld.get_state):
    fast-downward's optimal plan is followed up to the first object it takes or uses (a lamp), and only if
    that object is one the observations have shown; then it plans again. Until it has, the expert goes to the
    receptacles it has not looked into and where such an object may be (`may_hold`: a 53-receptacle kitchen
    has 9 places for an apple, and looking into all 53 runs past `cap`), in an order seeded by the episode,
    opening the closed ones, until an object of the kind it needs shows up (or it has looked everywhere). It
    depends on the state alone, and the plan from a state along a plan is that plan's rest but for ties among
    optimal plans (AlfWorld.expert_plan keeps them). The planner alone
    goes straight to an object it cannot have seen: its traces never leave a receptacle for holding the wrong
    thing (RESULTS.md, ALFWorld). Returns the commands until the goal holds; None past `cap` commands or if
    the planner finds no plan."""
    if getattr(eng, "gamefile", None) != state["gamefile"]:
        eng.load(state["gamefile"])
        eng.gamefile = state["gamefile"]
    eng.reset()
    _replay_ops(eng.unwrapped, state["ops"])
    pe, plan, won, tried = eng.unwrapped, [], False, set()
    seen, looked, last = set(state["seen"]), set(state["looked"]), state["obs"]
    here = next((c[6:] for c in reversed(state["cmds"]) if c.startswith("go to ")), None)
    order = [receptacles[i] for i in np.random.default_rng(state["seed"]).permutation(len(receptacles))]

    def play(cmd):
        nonlocal won, last, here
        st, _, _ = eng.step(cmd)
        plan.append(cmd)
        here, last, won = cmd[6:] if cmd.startswith("go to ") else here, st.feedback, bool(st["won"])
        seen.update(names(last))
        looked.update(looked_into(last))

    while not won:
        if len(plan) > cap:
            return None
        steps = pe._pddl_state.replan(pe._entity_infos)
        if not steps:
            return None
        use = next((i for i, c in enumerate(steps) if USES.match(c)), None)
        wanted = USES.match(steps[use]).group(1) if use is not None else None
        kind = wanted and wanted.rsplit(" ", 1)[0]
        left = [r for r in order if r not in looked and r not in tried and may_hold(r, kind or "")]
        if wanted is None or wanted in seen or not left:
            for c in steps[:None if use is None else use + 1]:
                play(c)
            continue
        for r in left:       # until an object of the wanted kind shows up
            tried.add(r)
            if r != here:
                play(f"go to {r}")
            if r not in looked and "is closed" in last:
                play(f"open {r}")
            if any(n.rsplit(" ", 1)[0] == kind for n in seen) or len(plan) > cap:
                break
    return plan


# ----------------------------------------------------------------------------- official games
def data_root():
    """Where alfworld keeps its data: $ALFWORLD_DATA, else ~/.cache/alfworld, as alfworld/info.py decided when
    this module imported alfworld, before any game (so the first env of a process already finds them)."""
    return alfworld.info.ALFWORLD_DATA


def official_games(split):
    """The official game files of a split, sorted; [] when there are none."""
    envs.check_split(split)
    return collect_game_files(os.path.join(data_root(), "json_2.1.1", OFFICIAL_DIRS[split]))


@functools.lru_cache(maxsize=None)
def collect_game_files(folder):
    """AlfredTWEnv.collect_game_files' filter: a trial folder with traj_data.json of one of the six task types
    (no movable-receptacle or sliced tasks) and a game.tw-pddl marked solvable."""
    def keep(root):
        game = os.path.join(root, "game.tw-pddl")
        return ("movable" not in root and "Sliced" not in root and os.path.exists(game)
                and json.load(open(os.path.join(root, "traj_data.json"))).get("task_type") in TASK_TYPES
                and json.load(open(game)).get("solvable"))
    return sorted(os.path.join(r, "game.tw-pddl") for r, _, files in os.walk(folder)
                  if "traj_data.json" in files and keep(r))


# ----------------------------------------------------------------------------- the engine
@contextmanager
def _seeded(seed):
    """ALFWorld's hand-coded expert uses the global `random`; seed it locally for determinism."""
    saved = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved)


def _move_form(cmd):
    """`put O in/on R` (older game files; also into/onto/in/on) -> `move O to R`; other commands unchanged."""
    m = re.fullmatch(r"put (.+? \d+) (?:in/on|into|onto|in|on) (.+)", cmd)
    return f"move {m.group(1)} to {m.group(2)}" if m else cmd


def admissible_form(cmd, admissible):
    """`cmd` as the game says it: itself if admissible, else the admissible command with the same move form
    (a `put` for a `move` or the other way round), else None."""
    if cmd in admissible:
        return cmd
    key = _move_form(cmd)
    return next((c for c in admissible if _move_form(c) == key), None)


@functools.lru_cache(maxsize=64)
def _pddl2sas(domain, problem, verbose=False, optimize=False):
    argv = sys.argv[:]
    try:
        return pddl2sas(domain, problem, verbose=verbose, optimize=optimize)
    finally:
        sys.argv[:] = argv   # the translator overwrites sys.argv


# The two engine classes below change things for this module's engines only: alfworld's and textworld's own
# classes and functions stay as they are for everyone else.
class _Pddl(PddlEnv):
    """PddlEnv whose PDDL->SAS translation (the bulk of a load or reset) is memoised: textworld calls
    fast_downward.pddl2sas, which points at the memo only while this class loads or resets."""
    def load(self, game):
        self._memoised(super().load, game)

    def reset(self):
        return self._memoised(super().reset)

    @staticmethod
    def _memoised(fn, *args):
        orig, fast_downward.pddl2sas = fast_downward.pddl2sas, _pddl2sas
        try:
            return fn(*args)
        finally:
            fast_downward.pddl2sas = orig


class _Expert(AlfredExpert):
    """0.4.2's hand-coded expert looks for `move O to R` among the admissible commands (older game files say
    `put O in/on R`) but tracks what it holds by looking for "put" in its last command (after a `move` it kept
    the object and stalled on pick_two tasks). So it is shown the commands in move form and its last one in put
    form, and its plan comes back in the game's own form."""
    def _gather_infos(self):
        adm, last = self.state["admissible_commands"], self.prev_command
        self.state["admissible_commands"] = [_move_form(c) for c in adm]
        self.prev_command = re.sub(r"^move (.+? \d+) to ", r"put \1 in/on ", last)
        try:
            super()._gather_infos()
        finally:
            self.state["admissible_commands"], self.prev_command = adm, last
        self.state["extra.expert_plan"] = [admissible_form(c, adm) or "look" for c in self.state["extra.expert_plan"]]


def _engine(expert=False):
    """PddlEnv wrapped the way ALFWorld does: AlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv)))."""
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=expert, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(_Pddl(infos), shuffle=False))
    return _Expert(env, expert_type="handcoded") if expert else env


def carrying(pe):
    """What ALFWorld's own `inventory` command would answer, read from the real state (its `holds` facts) without
    playing the command. The observation never says what the agent holds: the command (a step) or the history
    has to."""
    held = [pe._entity_infos[f.arguments[1].name].name for f in pe._pddl_state.facts if f.name == "holds"]
    return f"You are carrying: a {held[0]}." if held else "You are not carrying anything."   # a take needs empty hands


def looked_line(looked):
    """The receptacles whose contents the agent has seen, in name then number order ("drawer 2" before
    "drawer 10"). Prompts and histories show it, future states do not (AlfWorld.future_skip): in the first run
    with it, it made traces of 183 tokens on average and 315 at most, past the 192-token generation budget."""
    if not looked:
        return "You have not looked into anything."
    order = sorted(looked, key=lambda r: (r.rsplit(" ", 1)[0], int(r.rsplit(" ", 1)[1])))
    return "You have looked into: " + ", ".join(order) + "."


def _replay_ops(pe, ops):
    """Re-apply fast-downward operator ids to a freshly reset PddlEnv, deriving the admissible command texts
    (the costly part of an engine step) only once at the end. Operator ids are stable: same SAS, same ids."""
    ps = pe._pddl_state
    for op in ops:
        ps.all_applicable_actions()  # refreshes ps._operators, which apply() looks the id up in
        ps.apply(SimpleNamespace(id=op))
    pe._gather_infos()
    return pe.state["admissible_commands"]


# ----------------------------------------------------------------------------- the environment
class AlfWorld:
    """One ALFWorld episode at a time, speaking envs.Env. `games`: the official game files played (seed k of a
    split plays games[k % len(games)]), or None when generated games are played."""
    name, rules = "alfworld", RULES
    future_skip = ("You have looked into", "You have not looked into")   # looked_line: not in future states

    def __init__(self, split="train", max_steps=50, cache_dir=None, data="auto", expert="handcoded",
                 expert_cap=50, future_items=0, inventory=False, looked=False):
        envs.check_split(split)
        for opt, val, ok in (("data", data, ("auto", "generated", "official")),
                             ("expert", expert, ("handcoded", "planner", "explorer"))):
            if val not in ok:
                raise ValueError(f"alfworld option {opt} must be one of {ok}, got {val!r}")
        self.split, self.max_steps, self.cache_dir = split, int(max_steps), cache_dir
        self.expert, self.expert_cap = expert, expert_cap
        self.future_items = envs.check_future_lines(future_items, "future_items")   # envs.future_text
        for opt, val in (("inventory", inventory), ("looked", looked)):
            if not isinstance(val, bool):
                raise ValueError(f"alfworld option {opt} must be true or false, got {val!r}")
        self.inventory = inventory  # each observation ends with what the agent holds (carrying)
        self.looked = looked        # ... and with the receptacles looked into so far (looked_line)
        self.games = official_games(split) if data != "generated" else []
        if data == "official" and not self.games:
            raise ValueError(f"data='official' but no official {OFFICIAL_DIRS[split]} games under "
                             f"{os.path.join(data_root(), 'json_2.1.1')} (set $ALFWORLD_DATA)")
        self.games = self.games or None
        self._eng = _engine()
        self._expert_eng = None   # the hand-coded expert's engine, or the explorer's scratch engine
        self._plans = {}          # expert_plan's memo: (game, seed, commands) -> plan (see expert_plan)
        self.gamefile, self.seed, self.task_type = None, None, ""
        self.task, self.obs, self.steps, self.done, self.success = "", "", 0, False, False
        self._cmds, self._ops, self._adm = (), (), []
        self._seen = frozenset()    # object and receptacle names the observations so far have shown (the explorer)
        self._looked = frozenset()  # receptacles whose contents they have listed
        self._receptacles = {}    # game file -> every receptacle's name (the "go to" targets at reset)

    def _load(self, path):
        if path != self.gamefile:
            self._eng.load(path)
            self.gamefile = path
            with open(os.path.join(os.path.dirname(path), "traj_data.json")) as f:
                self.task_type = json.load(f).get("task_type", "")

    def reset(self, seed):
        self.seed = int(seed)
        self._load(self.games[self.seed % envs.SPLIT_SIZE % len(self.games)] if self.games else
                   generate_game(self.split, self.seed, self.cache_dir, expert_cap=self.expert_cap))
        st = self._reset_engine()
        self._seen, self._looked = frozenset(names(st.feedback)), frozenset(looked_into(st.feedback))
        self.obs, self._adm = self._observe(st.feedback), st["admissible_commands"]
        m = re.search(r"Your task is to: (.*)", st.feedback)
        self.task = m.group(1).strip().rstrip(".") if m else ""
        self.steps, self.done, self.success, self._cmds, self._ops = 0, False, False, (), ()
        return self.obs

    def _reset_engine(self):
        st = self._eng.reset()
        self._receptacles.setdefault(self.gamefile, sorted(c[6:] for c in st["admissible_commands"]
                                                           if c.startswith("go to ")))
        return st

    def step(self, action):
        if self.gamefile is None:
            raise ValueError("AlfWorld.step called before reset")
        if self.done:
            return envs.after_done(self)
        cmd = self._admissible(action)
        reward = 0.0
        if cmd is not None:
            st, reward, _ = self._eng.step(cmd)
            self._seen, self._looked = self._seen | names(st.feedback), self._looked | looked_into(st.feedback)
            self.obs, self._adm = self._observe(st.feedback), st["admissible_commands"]
            self.success = bool(st["won"])
            self._cmds += (cmd,)
            self._ops += (self._eng.unwrapped._last_action.id,)
        else:
            self.obs = self._observe("Nothing happens.")
        self.steps += 1
        self.done = self.success or self.steps >= self.max_steps
        return self.obs, float(reward), self.done, {"success": self.success, "action_is_valid": cmd is not None}

    def _admissible(self, action):
        """The admissible command `action` names (case, spaces, a final "." and put/move forms aside), or None."""
        return admissible_form(" ".join(str(action).lower().split()).rstrip(".").strip(), self._adm)

    def admits(self, action):
        """Whether step(action) would be a valid move (agent.admit, the admissible option)."""
        return self._admissible(action) is not None

    def _observe(self, feedback):
        """The engine's feedback; with the inventory option what the agent holds on a line of its own (so a
        prompt whose history no longer shows the `take` still says it; RESULTS.md, The text environments); with
        the looked option the receptacles looked into so far (a two-step history cannot say where the agent has
        already searched, and the explorer's next move depends on it)."""
        if not (self.inventory or self.looked):
            return feedback
        extra = [carrying(self._eng.unwrapped)] if self.inventory else []
        extra += [looked_line(self._looked)] if self.looked else []
        return "\n".join([feedback.rstrip()] + extra)

    def get_state(self):
        return dict(split=self.split, seed=self.seed, gamefile=self.gamefile, task=self.task, cmds=list(self._cmds),
                    ops=list(self._ops), obs=self.obs, steps=self.steps, done=self.done, success=self.success,
                    seen=sorted(self._seen), looked=sorted(self._looked))

    def set_state(self, state):
        ops = tuple(state["ops"])
        if state["gamefile"] != self.gamefile or ops != self._ops:
            self._load(state["gamefile"])
            self._reset_engine()
            self._adm = _replay_ops(self._eng.unwrapped, ops)
        self.seed, self._cmds, self._ops = state["seed"], tuple(state["cmds"]), ops
        self._seen, self._looked = frozenset(state["seen"]), frozenset(state["looked"])
        self.obs, self.steps, self.done, self.success = state["obs"], state["steps"], state["done"], state["success"]
        self.task = state["task"]

    def render(self):
        return self.obs

    def valid_actions(self):
        """The admissible commands but "help": the engine's fixed list of command forms, which says nothing of
        the world and costs a trace about 200 tokens (a random rollout that played it put the list in a trace,
        and a tie of values once chose it). Typed, it is still played."""
        return [c for c in self._adm if c != "help"]

    def action_hint(self):
        return "Admissible commands: " + ", ".join(self.valid_actions())

    def expert_plan(self):
        """expert="handcoded" (default): ALFWorld's hand-coded expert played out in a second engine; it first
        watches the commands played so far (it tracks what it has seen), then acts until the goal holds.
        None if it fails within expert_cap further steps. The plan may be longer than the steps left.
        expert="planner": fast-downward's optimal plan from the current state (it knows where everything is).
        expert="explorer": the planner's plan, but only up to an object it has seen; to find one it goes to the
        receptacles in a seeded order and opens the closed ones (explorer_plan).
        Each is a function of (game, seed, commands played), so plans are memoised by that key: a ReSim tree
        asks at its root once per expert rollout and again at each leaf, the next real state's root (a
        planner call is about 0.5 s, a hand-coded play 3 s). An explorer plan is also kept for every state
        along it: the real path mostly follows it, and its next state then needs no new play."""
        if self.success:
            return []
        key = (self.gamefile, self.seed, self._cmds)
        if key not in self._plans:
            if len(self._plans) >= PLAN_MEMO:
                self._plans.clear()
            plan = self._plans[key] = self._expert_plan()
            for i in range(1, len(plan or []) if self.expert == "explorer" else 0):
                self._plans.setdefault((self.gamefile, self.seed, self._cmds + tuple(plan[:i])), plan[i:])
        plan = self._plans[key]
        return None if plan is None else list(plan)

    def _expert_plan(self):
        if self.expert == "planner":
            pe = self._eng.unwrapped
            return pe._pddl_state.replan(pe._entity_infos) or None
        if self.expert == "explorer":
            if self._expert_eng is None:
                self._expert_eng = _engine()
            return explorer_plan(self._expert_eng, self.get_state(), self._receptacles[self.gamefile],
                                 self.expert_cap)
        if self._expert_eng is None:
            self._expert_eng = _engine(expert=True)
        return _expert_play(self._expert_eng, self.gamefile, self._cmds, hash((self.seed, len(self._cmds))),
                            self.expert_cap)

    @staticmethod
    def state_similarity(imagined, real):
        return envs.token_f1(imagined, real)


def make_env(split, **options):
    """An ALFWorld env of `split`; options: max_steps, cache_dir, data (auto | generated | official), expert
    (handcoded | planner | explorer), expert_cap, future_items (k > 0: a future state in traces, refinement
    prompts and the simulation score lists at most k of what a receptacle holds, envs.cut_lists; 0: the whole
    observation), inventory (true: each observation ends with what the agent holds, as ALFWorld's `inventory`
    command words it; false, ALFWorld's and the paper's: it does not), looked (true: each observation ends with
    the receptacles whose contents the agent has seen, looked_line; false, ALFWorld's: it does not)."""
    envs.check_split(split)
    envs.check_options("alfworld", options, OPTIONS)
    return AlfWorld(split=split, **options)
