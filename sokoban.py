"""Sokoban as a text environment (gym-sokoban rules and room generator, RAGEN's text grid).

Arrays and codes follow gym-sokoban 0.0.6 exactly:
  room_fixed: 0 wall, 1 floor, 2 target
  room_state: 0 wall, 1 floor, 2 target, 3 box on target, 4 box, 5 player
Only numpy (and envs.py) is needed at import time (the gym-sokoban comparison imports this file from another
venv).

    python sokoban.py --play [--seed N | --xsb FILE] [--split id|ood] [--solve]
"""
import argparse
from collections import deque

import numpy as np

import envs

RULES = """You are solving Sokoban. You are the player on a grid; push every box onto a target.
Legend: # wall, _ floor, O target, X box, √ box on target, P player, S player on target.
Actions: Up, Down, Left, Right (one per turn). Moving into a box pushes it one cell in that direction
if the cell behind it is floor or target; a box cannot be pushed into a wall or another box, and boxes
cannot be pulled. Moving into a wall does nothing. A box pushed into a corner is stuck for good.
The puzzle is solved when all boxes are on targets; you have a limited number of steps."""

ACTIONS = ("Up", "Down", "Left", "Right")             # gym-sokoban push actions 1-4
_ACTION_IDS = {a.lower(): i for i, a in enumerate(ACTIONS)}
_DELTAS_RC = ((-1, 0), (1, 0), (0, -1), (0, 1))
CHARS = {0: "#", 1: "_", 2: "O", 3: "√", 4: "X", 5: "P"}   # player on target -> "S"

# per-split room size and episode cap (overridable in make_env); seeds come from envs.split_seeds
SPLITS = {
    "train": dict(dim=(6, 6), num_boxes=1, max_steps=20, min_solution=1, max_solution=20),
    "id": dict(dim=(6, 6), num_boxes=1, max_steps=20, min_solution=1, max_solution=20),
    "ood": dict(dim=(8, 8), num_boxes=2, max_steps=30, min_solution=1, max_solution=30),
}


# ---------------------------------------------------------------------------------------------
# room generation (gym-sokoban's room_utils, driven by a numpy Generator)

_MASKS = [np.array(m) for m in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]],
    [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[0, 0, 0], [1, 1, 0], [0, 1, 0]],
    [[0, 0, 0], [1, 1, 0], [1, 1, 0]],
    [[0, 0, 0], [0, 1, 1], [0, 1, 0]],
)]
_WALK_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))


def room_topology(rng, dim, p_change=0.35, num_steps=15):
    """Random walk stamping 3x3 masks; border forced to wall. 0 wall, 1 floor."""
    h, w = dim
    dr, dc = _WALK_DIRS[rng.integers(4)]
    r, c = int(rng.integers(1, h)), int(rng.integers(1, w))   # gym: randint(1, dim-1) inclusive
    level = np.zeros(dim, dtype=int)
    for _ in range(num_steps):
        if rng.random() < p_change:
            dr, dc = _WALK_DIRS[rng.integers(4)]
        r = max(min(r + dr, h - 2), 1)
        c = max(min(c + dc, w - 2), 1)
        level[r - 1:r + 2, c - 1:c + 2] += _MASKS[rng.integers(5)]
    level[level > 0] = 1
    level[:, [0, w - 1]] = 0
    level[[0, h - 1], :] = 0
    return level


def place_boxes_and_player(rng, room, num_boxes):
    """Player on a random floor cell, then targets (code 2) on random remaining floor cells."""
    rows, cols = np.where(room == 1)
    if len(rows) <= num_boxes + 1:
        raise RuntimeError(f"not enough free spots (#{len(rows)}) for 1 player and {num_boxes} boxes")
    i = rng.integers(len(rows))
    room[rows[i], cols[i]] = 5
    for _ in range(num_boxes):
        rows, cols = np.where(room == 1)
        i = rng.integers(len(rows))
        room[rows[i], cols[i]] = 2
    return room


def reverse_play(room_fixed, room_state, max_states=300_000, ttl=300):
    """gym-sokoban's reverse_playing as an iterative DFS over (player, boxes) on flat indices.

    room_state has every box on its target. Same visiting order, dedup key (the room_state array,
    where a pulled box is code 3 and an untouched one code 4), depth limit and state cap as gym's
    recursion, so it returns the same room and score. Score = pulls on the path (gym's "box swaps",
    which count every pull because gym passes the parent's last_pull down) x summed Manhattan
    displacement of each box from its own target; 0 unless every target is free (no box, no player).
    Returns (room_state with boxes as 4, score)."""
    w = room_fixed.shape[1]
    fixed = room_fixed.ravel().tolist()
    targets = tuple(i for i, v in enumerate(fixed) if v == 2)
    player = room_state.ravel().tolist().index(5)
    deltas = (-w, w, -1, 1)
    visited = set()
    best, best_score = (player, targets), -1
    # node: (ttl passed in, player, box positions by identity, pulled bitmask, number of pulls)
    stack = [(ttl, player, targets, 0, 0)]
    while stack:
        t, p, boxes, pulled, npull = stack.pop()
        t -= 1
        if t <= 0 or len(visited) >= max_states:
            continue
        key = (p, pulled, tuple(sorted(b for j, b in enumerate(boxes) if pulled >> j & 1)))
        if key in visited:
            continue
        visited.add(key)
        score = 0
        if npull and p not in targets and not any(b in targets for b in boxes):
            score = npull * sum(abs(b // w - g // w) + abs(b % w - g % w) for b, g in zip(boxes, targets))
        if score > best_score:
            best, best_score = (p, boxes), score
        children = []
        for a in range(8):                       # gym's order: pulls 0-3, then moves 4-7
            d = deltas[a % 4]
            q = p + d
            if fixed[q] == 0 or q in boxes:      # next cell must be floor or empty target
                continue
            back = p - d
            if back in boxes:
                if a < 4:
                    j = boxes.index(back)
                    nb = boxes[:j] + (p,) + boxes[j + 1:]
                    children.append((t, q, nb, pulled | 1 << j, npull + 1))
                else:
                    children.append((t, q, boxes, pulled, npull))
            elif a < 4:                          # a move with nothing behind equals the pull action
                children.append((t, q, boxes, pulled, npull))
        stack.extend(reversed(children))
    p, boxes = best
    state = np.array(room_fixed, dtype=int)
    state.ravel()[list(boxes)] = 4
    state.ravel()[p] = 5
    return state, best_score


def generate_room(rng, dim=(6, 6), num_boxes=1, p_change=0.35, num_steps=None, tries=4):
    """gym-sokoban's generate_room: (room_fixed, room_state); RuntimeError if no room scores > 0."""
    num_steps = int(1.7 * (dim[0] + dim[1])) if num_steps is None else num_steps
    for _ in range(tries):
        room = place_boxes_and_player(rng, room_topology(rng, dim, p_change, num_steps), num_boxes)
        room_fixed = room.copy()
        room_fixed[room_fixed == 5] = 1
        room_state = room.copy()
        room_state[room_state == 2] = 4
        room_state, score = reverse_play(room_fixed, room_state)
        if score > 0:
            return room_fixed, room_state
    raise RuntimeError("generated room with score == 0")


# ---------------------------------------------------------------------------------------------
# solver: BFS over (player, box bitmask) on flat indices

def _live_cells(fixed, w):
    """Cells from which one box can still reach some target by pushes (others ignored).
    A box outside this set is dead (corner / wall deadlock): pruning it keeps BFS optimal."""
    live = [False] * len(fixed)
    queue = deque(i for i, v in enumerate(fixed) if v == 2)
    for i in queue:
        live[i] = True
    while queue:
        x = queue.popleft()
        for d in (-w, w, -1, 1):
            b = x - d                            # box at b pushed by +d lands on x; player at b - d
            if not live[b] and fixed[b] and fixed[b - d]:
                live[b] = True
                queue.append(b)
    return live


def solve_arrays(room_fixed, room_state, max_states=1_000_000):
    """BFS-optimal action list (gym step semantics) or None (unsolvable or state cap hit)."""
    w = room_fixed.shape[1]
    fixed = room_fixed.ravel().tolist()
    cells = room_state.ravel().tolist()
    n = len(fixed)
    goal = sum(1 << i for i, v in enumerate(fixed) if v == 2)
    boxes = sum(1 << i for i, v in enumerate(cells) if v in (3, 4))
    if boxes == goal:
        return []
    live = _live_cells(fixed, w)
    deltas = (-w, w, -1, 1)
    start = boxes * n + cells.index(5)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for key in frontier:
            bx, p = divmod(key, n)
            for a in range(4):
                d = deltas[a]
                q = p + d
                if not fixed[q]:
                    continue
                nb = bx
                if bx >> q & 1:
                    r = q + d
                    if not fixed[r] or not live[r] or bx >> r & 1:
                        continue
                    nb = bx ^ (1 << q) ^ (1 << r)
                nk = nb * n + q
                if nk in parent:
                    continue
                parent[nk] = (key, a)
                if nb == goal:
                    plan = []
                    while parent[nk] is not None:
                        nk, a = parent[nk]
                        plan.append(ACTIONS[a])
                    return plan[::-1]
                nxt.append(nk)
        if len(parent) > max_states:
            return None
        frontier = nxt
    return None


def solve(env, max_states=1_000_000):
    """BFS-optimal action list from env's current state; None if unsolvable or the cap is hit."""
    return solve_arrays(env.room_fixed, env.room_state, max_states)


# ---------------------------------------------------------------------------------------------
# XSB levels

_XSB = {"#": (0, 0), " ": (1, 1), "-": (1, 1), "_": (1, 1), ".": (2, 2), "$": (1, 4), "*": (2, 3),
        "@": (1, 5), "+": (2, 5)}   # char -> (room_fixed, room_state)


def parse_xsb(text):
    """XSB text -> (room_fixed, room_state). Floor outside the player's region becomes wall; a wall
    ring is added if the level touches the edge. ValueError (with line/column) on malformed input."""
    if not isinstance(text, str):
        raise ValueError(f"XSB level must be a string, got {type(text).__name__}")
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError("XSB level is empty")
    h, w = len(lines), max(len(ln) for ln in lines)
    fixed, state = np.zeros((h, w), dtype=int), np.zeros((h, w), dtype=int)
    player = None
    for r, ln in enumerate(lines):
        for c, ch in enumerate(ln):
            if ch not in _XSB:
                raise ValueError(f"XSB line {r + 1}, column {c + 1}: unknown character {ch!r}")
            fixed[r, c], state[r, c] = _XSB[ch]
            if ch in "@+":
                if player is not None:
                    raise ValueError(f"XSB line {r + 1}, column {c + 1}: second player "
                                     f"(first at line {player[0] + 1}, column {player[1] + 1})")
                player = (r, c)
    if player is None:
        raise ValueError("XSB level has no player ('@' or '+')")
    nbox, ngoal = int(np.isin(state, (3, 4)).sum()), int((fixed == 2).sum())
    if nbox == 0:
        raise ValueError("XSB level has no boxes ('$' or '*')")
    if nbox != ngoal:
        raise ValueError(f"XSB level has {nbox} boxes but {ngoal} goals (must be equal)")
    # exterior: non-wall cells the player cannot walk to (boxes treated as passable) that are plain floor
    seen = np.zeros((h, w), dtype=bool)
    seen[player] = True
    queue = [player]
    for r, c in queue:
        for dr, dc in _DELTAS_RC:
            rr, cc = r + dr, c + dc
            if 0 <= rr < h and 0 <= cc < w and not seen[rr, cc] and fixed[rr, cc]:
                seen[rr, cc] = True
                queue.append((rr, cc))
    outside = ~seen & (state == 1)
    fixed[outside] = state[outside] = 0
    border = np.ones((h, w), dtype=bool)
    border[1:-1, 1:-1] = False
    if (fixed[border] != 0).any() or (state[border] != 0).any():
        fixed, state = np.pad(fixed, 1), np.pad(state, 1)
    return fixed, state


def to_xsb(room_fixed, room_state):
    """Arrays -> XSB text (floor as space)."""
    return "\n".join("".join("+" if s == 5 and f == 2 else "# .*$@"[s] for f, s in zip(fr, sr))
                     for fr, sr in zip(room_fixed.tolist(), room_state.tolist()))


# ---------------------------------------------------------------------------------------------
# the environment

class Sokoban:
    """Text Sokoban with gym-sokoban dynamics and rewards. See module doc for array codes."""
    name, rules, task, task_type = "sokoban", RULES, "", ""

    def __init__(self, dim=(6, 6), num_boxes=1, max_steps=20, min_solution=1, max_solution=20,
                 p_change=0.35, num_gen_steps=None, max_attempts=1000, level=None, rooms=None):
        if min_solution > max_solution:
            raise ValueError(f"min_solution {min_solution} > max_solution {max_solution}")
        if rooms is not None and (not rooms or any(len(r) != 3 or min(r) < 1 for r in rooms)):
            raise ValueError(f"rooms must be a non-empty list of [height, width, boxes], got {rooms!r}")
        self.rooms = [tuple(r) for r in rooms] if rooms else None   # a mixture: seed s plays rooms[s % len]
        self.dim, self.num_boxes, self.max_steps = tuple(dim), num_boxes, max_steps
        self.min_solution, self.max_solution = min_solution, max_solution
        self.p_change, self.num_gen_steps, self.max_attempts = p_change, num_gen_steps, max_attempts
        self.level = level                     # (room_fixed, room_state) of a fixed level, or None
        self.room_fixed = self.room_state = None
        self.seed, self.solution_length = None, None
        self.steps, self.done, self.success, self.obs = 0, False, False, ""
        if level is not None:
            self.load_arrays(*level)

    @classmethod
    def from_xsb(cls, text, max_steps=100, **kw):
        return cls(level=parse_xsb(text), max_steps=max_steps, **kw)

    def to_xsb(self):
        return to_xsb(self.room_fixed, self.room_state)

    # -- setup -----------------------------------------------------------------------------
    def _set_fixed(self, room_fixed):
        room_fixed = np.array(room_fixed, dtype=int)
        room_fixed.flags.writeable = False      # shared by every get_state snapshot
        self.room_fixed = room_fixed
        h, w = room_fixed.shape
        self._fixed = room_fixed.ravel().tolist()
        self._deltas = (-w, w, -1, 1)
        self._tidx = [i + i // w for i in range(h * w)]   # flat cell -> index in the text (rows + "\n")
        self.n_targets = self._fixed.count(2)

    def load_arrays(self, room_fixed, room_state):
        """Start an episode from gym-style arrays (copied). Counters reset."""
        room_fixed, room_state = np.asarray(room_fixed), np.asarray(room_state)
        if room_fixed.shape != room_state.shape or room_state.ndim != 2:
            raise ValueError(f"room_fixed {room_fixed.shape} and room_state {room_state.shape} must be "
                             "2-D arrays of the same shape")
        if (room_state == 5).sum() != 1:
            raise ValueError("room_state must hold exactly one player (code 5)")
        self._set_fixed(room_fixed)
        self.room_state = np.array(room_state, dtype=int)
        self._rs = self.room_state.reshape(-1)    # view: in-place writes keep room_state current
        self._cells = self._rs.tolist()
        self._player = self._cells.index(5)
        self._bot = self._cells.count(3)           # boxes on targets
        self.steps, self.success = 0, self._bot == self.n_targets
        self.done = self.success or self.steps >= self.max_steps
        self._text = ["\n"] * (len(self._cells) + self.room_fixed.shape[0] - 1)
        for i, v in enumerate(self._cells):
            self._paint(i, v)
        self.obs = "".join(self._text)
        return self.obs

    def _paint(self, i, v):
        self._text[self._tidx[i]] = "S" if v == 5 and self._fixed[i] == 2 else CHARS[v]

    def _generate(self, seed):
        """Room for this seed: attempt k uses default_rng([seed, k]); reject by solution length."""
        for k in range(self.max_attempts):
            rng = np.random.default_rng(seed if k == 0 else [seed, k])
            try:
                fixed, state = generate_room(rng, self.dim, self.num_boxes, self.p_change, self.num_gen_steps)
            except RuntimeError:
                continue
            plan = solve_arrays(fixed, state)
            if plan is not None and self.min_solution <= len(plan) <= self.max_solution:
                return fixed, state, len(plan)
        raise RuntimeError(f"no {self.dim} room with {self.num_boxes} boxes and solution length in "
                           f"[{self.min_solution}, {self.max_solution}] after {self.max_attempts} "
                           f"attempts (seed {seed})")

    # -- protocol --------------------------------------------------------------------------
    def reset(self, seed=0):
        self.seed = seed
        if self.level is not None:             # a fixed (XSB) level ignores the seed
            return self.load_arrays(*self.level)
        if self.rooms:
            h, w, self.num_boxes = self.rooms[seed % len(self.rooms)]
            self.dim = (h, w)
        fixed, state, self.solution_length = self._generate(seed)
        return self.load_arrays(fixed, state)

    def step(self, action):
        a = _ACTION_IDS.get(action.strip().lower()) if isinstance(action, str) else None
        if self.room_state is None:
            raise RuntimeError("Sokoban.step before reset(seed)")
        if self.done:
            return envs.after_done(self)
        self.steps += 1
        reward, moved, bot = -0.1, False, self._bot
        if a is not None:
            cells, fixed, d, p = self._cells, self._fixed, self._deltas[a], self._player
            q = p + d
            cq = cells[q]
            if cq == 3 or cq == 4:             # push if the cell behind is floor/target, else blocked
                r = q + d
                if cells[r] == 1 or cells[r] == 2:
                    box = 3 if fixed[r] == 2 else 4
                    self._put(r, box)
                    self._bot += (box == 3) - (cq == 3)
                    moved = True
            elif cq == 1 or cq == 2:
                moved = True
            if moved:
                self._put(p, fixed[p])
                self._put(q, 5)
                self._player = q
                self.obs = "".join(self._text)
        if self._bot > bot:                    # same order of float ops as gym-sokoban
            reward += 1
        elif self._bot < bot:
            reward += -1
        self.success = self._bot == self.n_targets
        if self.success:
            reward += 10
        self.done = self.success or self.steps >= self.max_steps
        return self.obs, reward, self.done, {"success": self.success, "action_is_valid": a is not None}

    def _put(self, i, v):
        self._cells[i] = v
        self._rs[i] = v
        self._text[self._tidx[i]] = "S" if v == 5 and self._fixed[i] == 2 else CHARS[v]

    @property
    def player_position(self):
        return divmod(self._player, self.room_fixed.shape[1])

    def get_state(self):
        return dict(fixed=self.room_fixed, cells=tuple(self._cells), player=self._player, bot=self._bot,
                    steps=self.steps, done=self.done, success=self.success, obs=self.obs)

    def set_state(self, state):
        fixed, cells = state["fixed"], state["cells"]
        self._player, self._bot, self.steps = state["player"], state["bot"], state["steps"]
        self.done, self.success, self.obs = state["done"], state["success"], state["obs"]
        if fixed is not self.room_fixed:       # snapshot from another room (or unpickled)
            self._set_fixed(fixed)
            self.room_state = np.array(cells, dtype=int).reshape(self.room_fixed.shape)
            self._rs = self.room_state.reshape(-1)
        else:
            self._rs[:] = cells
        self._cells = list(cells)
        self._text = list(self.obs)

    def render(self):
        return self.obs

    def expert_plan(self):
        return solve(self)

    def valid_actions(self):
        return list(ACTIONS)

    def action_hint(self):
        return ""

    @staticmethod
    def state_similarity(imagined, real):
        return float(_norm_grid(imagined) == _norm_grid(real))


def _norm_grid(text):
    if not isinstance(text, str):
        return None
    return "\n".join(ln.rstrip() for ln in text.split("\n")).strip("\n")


# ---------------------------------------------------------------------------------------------
# splits

OPTIONS = ("dim", "num_boxes", "max_steps", "min_solution", "max_solution", "p_change", "num_gen_steps",
           "max_attempts", "rooms", "train_rooms")


def make_env(split, **overrides):
    """A Sokoban env for a split. train_rooms: a mixture of [height, width, boxes] for the train split only
    (the held-out splits keep their rooms); rooms: a mixture for every split."""
    envs.check_split(split)
    envs.check_options("sokoban", overrides, OPTIONS)
    train_rooms = overrides.pop("train_rooms", None)
    cfg = dict(SPLITS[split], **overrides)
    if split == "train" and train_rooms:
        cfg["rooms"] = train_rooms
    if "max_steps" in overrides and "max_solution" not in overrides:
        cfg["max_solution"] = min(cfg["max_solution"], cfg["max_steps"])   # keep rooms solvable in the cap
    return Sokoban(**cfg)


# ---------------------------------------------------------------------------------------------
# terminal play

def _play(env, solve_only=False):
    obs = env.render()
    print(obs)
    if env.solution_length is not None:
        print(f"(optimal solution: {env.solution_length} steps)")
    if solve_only:
        plan = env.expert_plan()
        print("solution:", "unsolvable" if plan is None else f"{len(plan)} steps: " + " ".join(plan))
        return
    keys = {"u": "Up", "d": "Down", "l": "Left", "r": "Right"}
    total = 0.0
    while not env.done:
        try:
            k = input("move (u/d/l/r, q quits)> ").strip().lower()
        except EOFError:
            break
        if k == "q":
            break
        obs, reward, done, info = env.step(keys.get(k, k))
        total += reward
        print(obs)
        print(f"step {env.steps}/{env.max_steps}  reward {reward:+.1f}  total {total:+.1f}"
              + ("" if info["action_is_valid"] else "  (invalid action)"))
    print("solved!" if env.success else "not solved.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--play", action="store_true", help="play in the terminal")
    ap.add_argument("--solve", action="store_true", help="print the optimal solution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--xsb", help="XSB level file")
    ap.add_argument("--split", default="id", choices=sorted(SPLITS))
    args = ap.parse_args(argv)
    if not (args.play or args.solve):
        ap.print_help()
        return
    if args.xsb:
        with open(args.xsb) as f:
            env = Sokoban.from_xsb(f.read())
    else:
        env = make_env(args.split)
        env.reset(args.seed)
    _play(env, solve_only=args.solve and not args.play)


if __name__ == "__main__":
    main()
