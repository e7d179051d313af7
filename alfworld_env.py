"""ALFWorld (text) for Dyna-Mind: the real TextWorld/PDDL engine of alfworld==0.4.2 on offline games.

No official games can be downloaded here, so `generate_game` builds ALFWorld games from what the wheel
ships (scene layouts, receptacle/object affordances, the PDDL domain, grammar and goal library): one
problem PDDL per (split, seed), checked by playing ALFWorld's hand-coded expert on it. When
$ALFWORLD_DATA/json_2.1.1 exists, the official games are used instead (train / valid_seen / valid_unseen).

Branching (get_state/set_state) replays the command prefix from reset: the engine state lives inside
fast-downward's C library and cannot be copied. The PDDL->SAS translation is memoised, so a replay costs one
SAS load plus about one engine step per command (see bench/bench_alfworld.py).
"""
import functools
import glob
import json
import os
import random
import re
import sys
from collections import Counter
from contextlib import contextmanager

import numpy as np

RULES = """You are an agent in a household (ALFWorld, text only). Each turn you get an observation and the
admissible commands; reply with exactly one command. Commands:
  go to X | open X | close X | take O from R | move O to R | examine X | use X | look | inventory
  heat O with microwave N | cool O with fridge N | clean O with sinkbasin N
Objects and receptacles are named with a number ("apple 1", "countertop 2"). Closed receptacles must be
opened to see or take what is inside. "put O in/on R" is accepted as "move O to R". A command that is not
admissible changes nothing and the observation is "Nothing happens."."""

TASK_TYPES = ["pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"]
GEN_VERSION = 1
SPLIT_BASE = {"train": 0, "id": 10_000_000, "ood": 20_000_000}  # disjoint seed ranges
OFFICIAL_DIRS = {"train": "train", "id": "valid_seen", "ood": "valid_unseen"}
GEN_STATS = Counter()  # generated / rejected games of this process (the retry counter)

# ALFRED's held-out (test) scene numbers are our OOD scenes; the other 96 scenes serve train and ID.
OOD_SCENES = list(range(1, 7)) + list(range(201, 207)) + list(range(301, 307)) + list(range(401, 407))
TRAIN_SCENES = [s for s in list(range(1, 31)) + list(range(201, 231)) + list(range(301, 331))
                + list(range(401, 431)) if s not in OOD_SCENES]
ROOMS = {"pick_and_place_simple": "KLBb", "pick_two_obj_and_place": "KLBb", "look_at_obj_in_light": "Lb",
         "pick_clean_then_place_in_recep": "Kb", "pick_heat_then_place_in_recep": "K",
         "pick_cool_then_place_in_recep": "K"}  # ALFRED's GOALS_VALID: Kitchen LivingRoom Bedroom bathroom
LAMPS = ["DeskLamp", "FloorLamp"]
LAMP_HOSTS = {"SideTable", "Desk", "Dresser", "CoffeeTable", "TVStand", "Shelf", "DiningTable"}
TASK_NEEDS = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),  # affordance, appliance
              "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
              "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}


def _alf():
    """Import alfworld lazily (heavy) and return (constants, goal library, package dir)."""
    import alfworld.gen.constants as C
    import alfworld.gen.goal_library as G
    return C, G, os.path.dirname(os.path.dirname(os.path.abspath(C.__file__)))


def _pddl_name(s):
    # ALFWorld's mangling (PlannedGameState.fix_pddl_str_chars), all at once so "#"->"-" is not re-mangled.
    table = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}
    return re.sub(r"[-#|+.,]", lambda m: table[m.group(0)], s)


def cache_root(cache_dir=None):
    root = cache_dir or os.path.join(os.environ.get("DYNAMIND_CACHE") or
                                     os.path.expanduser("~/.cache/dynamind"), "alfworld")
    root = os.path.abspath(root)
    repo = os.path.dirname(os.path.abspath(__file__))
    if root == repo or root.startswith(repo + os.sep):
        raise ValueError(f"ALFWorld cache {root} is inside the repository; set DYNAMIND_CACHE elsewhere")
    return root


# ----------------------------------------------------------------------------- scene + problem sampling
def _scene(num):
    C, _, pkg = _alf()
    lay = os.path.join(pkg, "gen", "layouts", f"FloorPlan{num}")
    objs = json.load(open(lay + "-objects.json"))
    receps = json.load(open(lay + "-openable.json"))
    points = np.load(lay + "-layout.npy")
    return objs, receps, points


def _room(scene):
    return "K_LBb"[scene // 100]  # FloorPlan 1-30 kitchens, 2xx living, 3xx bed, 4xx bathrooms


def _recep_type(rid):
    parts = rid.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


def _loc(x, z, rot, hor):
    return f"loc|{int(round(x / 0.25))}|{int(round(z / 0.25))}|{int(rot) // 90 % 4}|{int(hor)}"


def sample_problem(task_type, scene, rng):
    """One game as plain data (objects, receptacles, goal params) or None if the scene can't host it."""
    C, _, _ = _alf()
    objs, receps, points = _scene(scene)
    rtype = {r: _recep_type(r) for r in sorted(receps)}
    rloc = {r: _loc(*receps[r]) for r in rtype}
    val = C.VAL_RECEPTACLE_OBJECTS
    pickable = set().union(*val.values())
    present = [o for o in sorted(set(objs)) if o in pickable and o in C.OBJECTS and "Sliced" not in o]
    placed = {}  # object id -> receptacle id
    for t in present:
        hosts = [r for r in rtype if t in val.get(rtype[r], ())]
        for _ in range(int(rng.integers(1, 4)) if hosts else 0):
            placed[_obj_id(t, rng, placed)] = hosts[int(rng.integers(len(hosts)))]
    lamps = {}
    for t in [t for t in LAMPS if t in objs]:
        hosts = [r for r in rtype if rtype[r] in LAMP_HOSTS]
        if hosts:
            lamps[_obj_id(t, rng, placed)] = hosts[int(rng.integers(len(hosts)))]
    params = _pick_task(task_type, placed, lamps, rtype, rng)
    if params is None:
        return None
    recep_pts = {(receps[r][0], receps[r][1]) for r in rtype}
    free = [p for p in points.tolist() if tuple(p) not in recep_pts]
    x, z = free[int(rng.integers(len(free)))]
    start = _loc(x, z, 90 * int(rng.integers(4)), 30)
    if start in rloc.values():
        return None
    return dict(task_type=task_type, scene=scene, params=params, rtype=rtype, rloc=rloc,
                objects={**placed, **lamps}, start=start)


def _obj_id(t, rng, taken):
    while True:
        x, y, z = rng.uniform(-3, 3, size=3)
        oid = f"{t}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"
        if oid not in taken:
            return oid


def _pick_task(task_type, placed, lamps, rtype, rng):
    C, _, _ = _alf()
    counts = Counter(o.split("|")[0] for o in placed)
    rtypes = sorted(set(rtype.values()))
    where = {t: {rtype[r] for o, r in placed.items() if o.split("|")[0] == t} for t in counts}
    need = TASK_NEEDS.get(task_type)
    cands = []
    for t in sorted(counts):
        if task_type == "pick_two_obj_and_place" and counts[t] < 2:
            continue
        if need and (t not in C.VAL_ACTION_OBJECTS[need[0]] or need[1] not in rtypes):
            continue
        if task_type == "look_at_obj_in_light":
            cands += [(t, "", lamp.split("|")[0]) for lamp in sorted(lamps)]
            continue
        # the target receptacle type must accept t, must not already hold one (goal not met at start),
        # and is not the appliance of the task itself
        for r in rtypes:
            if t in C.VAL_RECEPTACLE_OBJECTS.get(r, ()) and r not in where[t] and (not need or r != need[1]):
                cands.append((t, r, ""))
    if not cands:
        return None
    obj, parent, toggle = cands[int(rng.integers(len(cands)))]
    return dict(object_target=obj, parent_target=parent, toggle_target=toggle,
                mrecep_target="", object_sliced=False)


def problem_pddl(p):
    """The problem PDDL text in ALFWorld's layout (ids mangled as ALFWorld does)."""
    C, G, _ = _alf()
    static = sorted(C.RECEPTACLES - set(C.MOVABLE_RECEPTACLES))
    otypes = sorted(C.OBJECTS_SET - set(static))
    rtypes_present = sorted(set(p["rtype"].values()))
    locs = sorted(set(p["rloc"].values()) | {p["start"]})
    A = C.VAL_ACTION_OBJECTS
    decl = (["agent1 # agent"] + [f"{t}Type # otype" for t in otypes] + [f"{t}Type # rtype" for t in static]
            + [f"{o} # object" for o in sorted(p["objects"])] + [f"{r} # receptacle" for r in p["rtype"]]
            + [f"{l} # location" for l in locs])
    init = [f"(atLocation agent1 {p['start']})"]
    for r, t in p["rtype"].items():
        init += [f"(receptacleType {r} {t}Type)", f"(receptacleAtLocation {r} {p['rloc'][r]})"]
        init += [f"(openable {r})"] if t in C.OPENABLE_CLASS_SET else []
    for rt in rtypes_present:
        init += [f"(canContain {rt}Type {ot}Type)" for ot in sorted(C.VAL_RECEPTACLE_OBJECTS.get(rt, ()))
                 if ot in C.OBJECTS_SET and ot in otypes]
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


def task_text(p, rng):
    _, G, _ = _alf()
    q = p["params"]
    tpl = G.gdict[p["task_type"]]["templates"]
    return tpl[int(rng.integers(len(tpl)))].format(obj=q["object_target"].lower(),
                                                    recep=q["parent_target"].lower(),
                                                    toggle=q["toggle_target"].lower(), mrecep="")


def write_game(folder, p, desc, walkthrough=None):
    """The three files ALFWorld plays: game.tw-pddl, traj_data.json (the expert reads it), problem.pddl."""
    _, _, pkg = _alf()
    os.makedirs(folder, exist_ok=True)
    pddl = problem_pddl(p)
    grammar = open(os.path.join(pkg, "data", "alfred.twl2")).read().replace("UNKNOWN GOAL", desc)
    game = dict(pddl_domain=open(os.path.join(pkg, "data", "alfred.pddl")).read(), grammar=grammar,
                pddl_problem=pddl, solvable=walkthrough is not None, walkthrough=walkthrough)
    traj = dict(task_type=p["task_type"], pddl_params=p["params"], scene=dict(floor_plan=f"FloorPlan{p['scene']}"),
                turk_annotations=dict(anns=[dict(task_desc=desc)]), gen_version=GEN_VERSION)
    open(os.path.join(folder, "initial_state.pddl"), "w").write(pddl)
    json.dump(traj, open(os.path.join(folder, "traj_data.json"), "w"))
    json.dump(game, open(os.path.join(folder, "game.tw-pddl"), "w"))
    return os.path.join(folder, "game.tw-pddl")


def generate_game(split, seed, cache_dir=None, max_tries=50, expert_cap=50):
    """Path of game.tw-pddl for (split, seed), generating and caching it on first use.

    Task type = TASK_TYPES[seed % 6]. A candidate is kept only if the engine loads it and ALFWorld's
    hand-coded expert wins within `expert_cap` steps (its actions are the walkthrough); otherwise a derived
    seed is tried (GEN_STATS counts rejections)."""
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLIT_BASE)}")
    folder = os.path.join(cache_root(cache_dir), split, str(seed))
    path = os.path.join(folder, "game.tw-pddl")
    if _cached_ok(folder):
        return path
    task_type = TASK_TYPES[seed % len(TASK_TYPES)]
    scenes = [s for s in (OOD_SCENES if split == "ood" else TRAIN_SCENES) if _room(s) in ROOMS[task_type]]
    tmp = f"{folder}.tmp{os.getpid()}"
    for attempt in range(max_tries):
        rng = np.random.default_rng([seed, SPLIT_BASE[split] // 10_000_000, attempt])
        p = sample_problem(task_type, scenes[int(rng.integers(len(scenes)))], rng)
        if p is None:
            GEN_STATS["no_task_in_scene"] += 1
            continue
        desc = task_text(p, rng)
        gpath = write_game(tmp, p, desc)
        walk = _expert_walkthrough(gpath, seed * 1000 + attempt, expert_cap)
        if walk is None:
            GEN_STATS["rejected_by_engine"] += 1
            continue
        write_game(tmp, p, desc, walkthrough=walk)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.replace(tmp, folder)  # atomic: a concurrent generator of the same seed writes the same game
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        GEN_STATS["generated"] += 1
        return path
    raise RuntimeError(f"no ALFWorld game for split={split} seed={seed} after {max_tries} tries")


def _cached_ok(folder):
    try:
        traj = json.load(open(os.path.join(folder, "traj_data.json")))
        return traj.get("gen_version") == GEN_VERSION and os.path.exists(os.path.join(folder, "game.tw-pddl"))
    except (OSError, ValueError):
        return False


def _expert_walkthrough(gamefile, seed, cap):
    try:
        eng = _engine(expert=True)
        with _seeded(seed):
            eng.load(gamefile)
            st = eng.reset()
            walk = []
            while not st["won"] and len(walk) < cap:
                cmd = st["extra.expert_plan"][0]
                walk.append(cmd)
                st, _, _ = eng.step(cmd)
        return walk if st["won"] else None
    except Exception:  # the engine rejects the problem (translator error, expert timeout, ...)
        return None


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


_ENGINE_PATCHED = False


def _patch_engine():
    """Memoise PDDL->SAS translation (the bulk of a reset) and stop it from clobbering sys.argv; let the
    hand-coded expert track `move O to R` (v0.4 renamed `put`, but its state tracking still looks for "put",
    so after a put it kept the object in its inventory and stalled on pick_two tasks)."""
    global _ENGINE_PATCHED
    if _ENGINE_PATCHED:
        return
    from alfworld.agents.expert.handcoded_expert import BasePolicy
    track = BasePolicy.update_state_tracking

    def update_state_tracking(self, game_state, last_action):
        if last_action.startswith("move "):
            last_action = "put " + last_action[len("move "):]
        return track(self, game_state, last_action)

    BasePolicy.update_state_tracking = update_state_tracking
    from textworld.envs.pddl import logic as pddl_logic
    fd = pddl_logic.fast_downward
    orig = fd.pddl2sas

    @functools.lru_cache(maxsize=256)
    def cached(domain, problem, verbose=False, optimize=False):
        argv = sys.argv[:]
        try:
            return orig(domain, problem, verbose=verbose, optimize=optimize)
        finally:
            sys.argv[:] = argv

    fd.pddl2sas = cached
    _ENGINE_PATCHED = True


def _engine(expert=False):
    """PddlEnv wrapped the way ALFWorld does: AlfredExpert(AlfredInfos(AlfredDemangler(PddlEnv)))."""
    import textworld
    from textworld.envs import PddlEnv
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
    _patch_engine()
    infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=expert, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
    return AlfredExpert(env, expert_type="handcoded") if expert else env


def _replay_ops(pe, ops):
    """Re-apply fast-downward operator ids to a freshly reset PddlEnv, deriving the admissible command texts
    (the costly part of an engine step) only once at the end. Operator ids are stable: same SAS, same ids."""
    ps = pe._pddl_state
    for op in ops:
        ps.all_applicable_actions()  # refreshes ps._operators, which apply() looks the id up in
        ps.apply(_OpRef(op))
    pe._gather_infos()
    return pe.state["admissible_commands"]


class _OpRef:
    def __init__(self, op_id):
        self.id = op_id


def normalize_action(action):
    """Lower-case, collapse spaces, drop a trailing period, old `put X in/on Y` -> `move X to Y`."""
    a = " ".join(str(action).lower().split()).rstrip(".").strip()
    m = re.fullmatch(r"put (.+?) (?:in/on|into|onto|in|on) (.+)", a)
    return f"move {m.group(1)} to {m.group(2)}" if m else a


def official_games(split):
    root = os.environ.get("ALFWORLD_DATA")
    if not root or not os.path.isdir(os.path.join(root, "json_2.1.1")):
        return None
    pattern = os.path.join(root, "json_2.1.1", OFFICIAL_DIRS[split], "**", "game.tw-pddl")
    files = sorted(f for f in glob.glob(pattern, recursive=True) if "movable" not in f and "Sliced" not in f)
    return files or None


class AlfWorld:
    name = "alfworld"

    def __init__(self, split="train", max_steps=50, cache_dir=None, data="auto", expert="handcoded",
                 expert_cap=50):
        if split not in SPLIT_BASE:
            raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLIT_BASE)}")
        if data not in ("auto", "generated", "official"):
            raise ValueError(f"data must be 'auto', 'generated' or 'official', got {data!r}")
        if expert not in ("handcoded", "planner"):
            raise ValueError(f"expert must be 'handcoded' or 'planner', got {expert!r}")
        self.split, self.max_steps, self.cache_dir = split, max_steps, cache_dir
        self.expert, self.expert_cap = expert, expert_cap
        self._official = official_games(split) if data != "generated" else None
        if data == "official" and self._official is None:
            raise ValueError("data='official' but $ALFWORLD_DATA/json_2.1.1 has no games for " + split)
        self._eng = _engine()
        self._expert_eng = None
        self.gamefile, self.seed, self.task_type = None, None, None
        self.task, self.obs, self.steps, self.done, self.success = "", "", 0, False, False
        self._cmds, self._ops, self._adm = (), (), []

    # -- protocol
    def gamefile_for(self, seed):
        if self._official:
            return self._official[seed % len(self._official)]
        return generate_game(self.split, seed, self.cache_dir, expert_cap=self.expert_cap)

    def reset(self, seed):
        seed = int(seed)
        path = self.gamefile_for(seed)
        if path != self.gamefile:
            self._eng.load(path)
            self.gamefile = path
            with open(os.path.join(os.path.dirname(path), "traj_data.json")) as f:
                self.task_type = json.load(f).get("task_type")   # evaluate reports success per type
        self.seed = seed
        st = self._eng.reset()
        self.obs, self._adm = st.feedback, st["admissible_commands"]
        m = re.search(r"Your task is to: (.*)", self.obs)
        self.task = m.group(1).strip().rstrip(".") if m else ""
        self.steps, self.done, self.success, self._cmds, self._ops = 0, False, False, (), ()
        return self.obs

    def step(self, action):
        if self.gamefile is None:
            raise ValueError("AlfWorld.step called before reset")
        cmd = normalize_action(action)
        valid = cmd in self._adm and not self.done
        reward = 0.0
        if valid:
            st, reward, _ = self._eng.step(cmd)
            self.obs, self._adm = st.feedback, st["admissible_commands"]
            self.success = bool(st["won"])
            self._cmds += (cmd,)
            self._ops += (self._eng.unwrapped._last_action.id,)
        else:
            self.obs = "Nothing happens."
        self.steps += 1
        self.done = self.success or self.steps >= self.max_steps
        return self.obs, float(reward), self.done, {"success": self.success, "action_is_valid": valid,
                                                    "won": self.success}

    def get_state(self):
        return dict(split=self.split, seed=self.seed, gamefile=self.gamefile, cmds=self._cmds, ops=self._ops,
                    obs=self.obs, steps=self.steps, done=self.done, success=self.success)

    def set_state(self, state):
        if state["gamefile"] != self.gamefile or state["ops"] != self._ops:
            if state["gamefile"] != self.gamefile:
                self._eng.load(state["gamefile"])
                self.gamefile = state["gamefile"]
            self._eng.reset()
            self._adm = _replay_ops(self._eng.unwrapped, state["ops"])
        self.seed, self._cmds, self._ops = state["seed"], tuple(state["cmds"]), tuple(state["ops"])
        self.obs, self.steps, self.done, self.success = state["obs"], state["steps"], state["done"], state["success"]

    def render(self):
        return self.obs

    def valid_actions(self):
        return list(self._adm)

    def action_hint(self):
        return "Admissible commands: " + ", ".join(self._adm)

    def expert_plan(self):
        """expert="handcoded" (default): ALFWorld's hand-coded expert played out in a second engine; it first
        watches the commands played so far (it tracks what it has seen), then acts until the goal holds.
        None if it fails within expert_cap further steps. The plan may be longer than the steps left.
        expert="planner": fast-downward's optimal plan from the current state (it knows where everything is)."""
        if self.success:
            return []
        if self.expert == "planner":
            pe = self._eng.unwrapped
            return pe._pddl_state.replan(pe._entity_infos) or None
        if self._expert_eng is None:
            self._expert_eng = _engine(expert=True)
        eng = self._expert_eng
        try:
            with _seeded(hash((self.seed, len(self._cmds))) & 0xFFFFFFFF):
                eng.load(self.gamefile)
                st = eng.reset()
                for c in self._cmds:
                    st, _, _ = eng.step(c)
                plan = []
                while not st["won"] and len(plan) < self.expert_cap:
                    plan.append(st["extra.expert_plan"][0])
                    st, _, _ = eng.step(plan[-1])
        except Exception:
            return None
        return plan if st["won"] else None

    @staticmethod
    def state_similarity(imagined, real):
        return token_f1(imagined, real)


def token_f1(a, b):
    ta, tb = re.findall(r"\w+", str(a).lower()), re.findall(r"\w+", str(b).lower())
    if not ta and not tb:
        return 1.0
    common = sum((Counter(ta) & Counter(tb)).values())
    if common == 0:
        return 0.0
    p, r = common / len(ta), common / len(tb)
    return 2 * p * r / (p + r)


def make_env(split, **overrides):
    return AlfWorld(split=split, **overrides)


def split_seeds(split, n, start=0):
    if split not in SPLIT_BASE:
        raise ValueError(f"unknown ALFWorld split {split!r}; expected one of {sorted(SPLIT_BASE)}")
    return [SPLIT_BASE[split] + start + i for i in range(n)]
