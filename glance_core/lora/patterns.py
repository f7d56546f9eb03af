"""peft's alpha_pattern / rank_pattern keys, matched without a backtracking regex engine.

peft applies a pattern key to a module when ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds. The keys
come from the file, so Python's backtracking `re` could take exponential time on a hostile one (nested
quantifiers). Here a key is parsed with Python's own regex parser and evaluated as sets of positions in
the module name, memoised per (node, start): the time is polynomial in the key and name lengths
whatever the key. Constructs that a position-set evaluation cannot express (backreferences,
lookarounds, flags) are refused with a PatternError.
"""
import re

try:
    import re._constants as C
    import re._parser as P
except ImportError:  # Python < 3.11
    import sre_constants as C
    import sre_parse as P

MAX_KEY = 1000       # characters of one pattern key
MAX_NAME = 300       # characters of one module name (real ones: under 100)
MAX_WORK = 1_000_000  # position-set operations per file: caps the time a hostile file can cost (seconds)
LITERALISH = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class PatternError(ValueError):
    """A pattern key this matcher cannot evaluate (the message says why)."""


class PatternSet:
    """The keys of one alpha_pattern/rank_pattern dict, looked up as peft does: the first key that matches."""

    def __init__(self, keys):
        self.keys = [compile_key(k) for k in keys]
        self.budget = [MAX_WORK]  # shared by every lookup: the whole file's work is bounded

    def lookup(self, name):
        """The first key (string) matching module `name`, or None."""
        if len(name) > MAX_NAME:
            raise PatternError(f"module name of {len(name)} characters (limit {MAX_NAME})")
        for k in self.keys:
            if k.matches(name, self.budget):
                return k.key
        return None


def compile_key(key):
    """Parse one pattern key into a matcher object; PatternError if it is unusable."""
    if not isinstance(key, str):
        raise PatternError(f"pattern key {key!r} is not a string")
    if len(key) > MAX_KEY:
        raise PatternError(f"pattern key of {len(key)} characters (limit {MAX_KEY})")
    try:
        tree = P.parse(key)
    except (C.error, RecursionError, OverflowError) as e:
        raise PatternError(f"pattern key {key[:80]!r} is not a valid regular expression ({e})") from None
    if tree.state.flags & ~(C.SRE_FLAG_UNICODE):
        raise PatternError(f"pattern key {key[:80]!r} uses regex flags, which are not supported here")
    try:
        _check_tree(tree)
    except PatternError as e:
        raise PatternError(f"pattern key {key[:80]!r}: {e}") from None
    return _Key(key, tree)


def _check_tree(items):
    # Refuse unsupported constructs up front, not only when a match happens to reach them.
    for op, av in items:
        if op in (C.LITERAL, C.NOT_LITERAL, C.ANY):
            continue
        if op is C.IN:
            _in_class(av, "a")
        elif op is C.SUBPATTERN:
            if av[1] or av[2]:
                raise PatternError("inline regex flags are not supported here")
            _check_tree(av[3])
        elif op is C.BRANCH:
            for alt in av[1]:
                _check_tree(alt)
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
            _check_tree(av[2])
        elif not (op is C.AT and av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING, C.AT_END, C.AT_END_STRING)):
            raise PatternError(f"regex construct {op} is not supported here (only what a module-name "
                               "pattern needs: literals, classes, groups, alternatives and repeats)")


class _Key:
    def __init__(self, key, tree):
        self.key = key
        self.tree = tree
        # A module name as key (what diffusers writes) has no quantifier, so `re` itself is safe and fast.
        self.literal = re.compile(rf"(.*\.)?({key})$") if key and set(key) <= LITERALISH else None

    def matches(self, name, budget=None):
        """True where peft's ``re.match(rf"(.*\\.)?({key})$", name)`` would match."""
        if len(name) > MAX_NAME:
            raise PatternError(f"module name of {len(name)} characters (limit {MAX_NAME})")
        if self.literal is not None:
            return self.literal.match(name) is not None
        ev = _Eval(name, budget if budget is not None else [MAX_WORK])
        starts = [0] + [i + 1 for i, ch in enumerate(name) if ch == "."]
        n = len(name)
        # "$" also matches before a final newline, as in `re`.
        ends = {n, n - 1} if name.endswith("\n") else {n}
        try:
            return any(ends & ev.seq(self.tree, s) for s in starts)
        except RecursionError:
            raise PatternError(f"pattern key {self.key[:80]!r} nests too deeply") from None


class _Eval:
    """Position-set evaluation of a parsed pattern over one string, memoised per (node, start)."""

    def __init__(self, text, budget):
        self.text = text
        self.memo = {}
        self.budget = budget

    def spend(self, n):
        self.budget[0] -= n + 1
        if self.budget[0] < 0:
            raise PatternError("pattern keys too complex to evaluate in bounded time (nested repeats?)")

    def seq(self, items, start):
        key = (id(items), start)
        hit = self.memo.get(key)
        if hit is not None:
            return hit
        pos = frozenset((start,))
        for op, av in items:
            nxt = set()
            for p in pos:
                got = self.node(op, av, p)
                self.spend(len(got) + len(nxt) // 8)
                nxt |= got
            pos = frozenset(nxt)
            if not pos:
                break
        self.memo[key] = pos
        return pos

    def node(self, op, av, p):
        t = self.text
        if op is C.LITERAL:
            return {p + 1} if p < len(t) and ord(t[p]) == av else set()
        if op is C.NOT_LITERAL:
            return {p + 1} if p < len(t) and ord(t[p]) != av else set()
        if op is C.ANY:
            return {p + 1} if p < len(t) and t[p] != "\n" else set()
        if op is C.IN:
            return {p + 1} if p < len(t) and _in_class(av, t[p]) else set()
        if op is C.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise PatternError("inline regex flags are not supported here")
            return set(self.seq(sub, p))
        if op is C.BRANCH:
            out = set()
            for alt in av[1]:
                out |= self.seq(alt, p)
            return out
        if op in (C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", None)):
            lo, hi, sub = av
            return self.repeat(sub, lo, hi, p)
        if op is C.AT:
            if av in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
                return {p} if p == 0 else set()
            if av in (C.AT_END, C.AT_END_STRING):
                n = len(t)
                return {p} if p == n or (av is C.AT_END and p == n - 1 and t.endswith("\n")) else set()
        raise PatternError(f"regex construct {op} is not supported here (only what a module-name "
                           "pattern needs: literals, classes, groups, alternatives and repeats)")

    def repeat(self, sub, lo, hi, p):
        # Which positions `lo` to `hi` repetitions of `sub` can reach from p. Beyond `lo`, each
        # round only explores positions not seen before, so at most len(text) + 1 rounds matter.
        key = (id(sub), lo, hi, p)
        hit = self.memo.get(key)
        if hit is not None:
            return set(hit)
        cur = {p}
        for _ in range(min(lo, len(self.text) + 1)):
            cur = set().union(*(self.seq(sub, q) for q in cur)) if cur else set()
        if lo > len(self.text) + 1:
            # Only empty-width repetitions could go on past the text's length.
            cur = {q for q in cur if q in self.seq(sub, q)}
        reached = set(cur)
        frontier = set(cur)
        rounds = lo
        while frontier and rounds < hi:
            nxt = set().union(*(self.seq(sub, q) for q in frontier)) - reached
            self.spend(len(frontier) + len(nxt))
            reached |= nxt
            frontier = nxt
            rounds += 1
        self.memo[key] = frozenset(reached)
        return reached


def _in_class(items, ch):
    o = ord(ch)
    negate = False
    hit = False
    for op, av in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            hit = hit or o == av
        elif op is C.RANGE:
            hit = hit or av[0] <= o <= av[1]
        elif op is C.CATEGORY:
            hit = hit or _category(av, ch)
        else:
            raise PatternError(f"character-class item {op} is not supported here")
    return hit != negate


def _category(cat, ch):
    if cat is C.CATEGORY_DIGIT:
        return ch.isdecimal()
    if cat is C.CATEGORY_NOT_DIGIT:
        return not ch.isdecimal()
    if cat is C.CATEGORY_SPACE:
        return ch.isspace()
    if cat is C.CATEGORY_NOT_SPACE:
        return not ch.isspace()
    if cat is C.CATEGORY_WORD:
        return ch.isalnum() or ch == "_"
    if cat is C.CATEGORY_NOT_WORD:
        return not (ch.isalnum() or ch == "_")
    raise PatternError(f"character category {cat} is not supported here")
