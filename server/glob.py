"""Glob patterns with Redis's ``stringmatchlen`` rules (KEYS, SCAN MATCH, ACL
key patterns).

- ``*`` any run of bytes, ``?`` one byte, ``\\x`` the byte ``x`` itself;
- ``[abc]`` one of, ``[^abc]`` none of, ``[a-z]`` a range (reversed ranges
  like ``[z-a]`` are swapped), ``\\`` escapes inside a class too;
- an unterminated class runs to the end of the pattern (``[ab`` is
  ``[ab]``, ``[`` matches nothing, ``[^`` any byte); a ``\\`` at the very end
  is a literal backslash;
- bytes compare as C's signed ``char`` in ranges (``[a-\\xff]`` is the range
  -1..97, as in Redis), and ``nocase`` lowers ASCII letters only (except for
  an escaped byte inside a class, which Redis compares exactly);
- the empty string matches only the empty pattern (``*`` does not match
  ``b""``: KEYS and SCAN special-case the pattern ``*`` as "every key", see
  :func:`matches_all`);
- Redis gives up at a nesting of 1000 ``*``: a pattern whose 1001st ``*`` is
  not its last token never matches.

:func:`compile` turns a pattern into a predicate once: each single-byte
token becomes the exact set of bytes it accepts (computed by the rules
above), and the pattern a regular expression in which every ``*`` segment
but the last is an atomic, leftmost search, so matching is linear-ish in the
key and cannot backtrack exponentially on patterns like ``*a*a*a*b``.
Patterns without wildcards and ``prefix*`` patterns compare bytes directly.
:func:`stringmatch` is the one-shot form.
"""

import re

__all__ = ["compile", "stringmatch", "matches_all", "filter_keys", "GlobPattern"]

_STAR = None          # a '*' group among the tokens; other tokens are frozensets
_NESTING_LIMIT = 1000


def _signed(b):
    return b - 256 if b >= 128 else b


def _lower(c):
    # C's tolower() in the "C" locale: only A-Z change (negative chars stay).
    return c + 32 if 65 <= c <= 90 else c


def _class_set(items, negate, nocase):
    """The bytes a ``[...]`` class accepts, by Redis's per-item tests."""
    accepted = set()
    for b in range(256):
        c = _signed(b)
        match = False
        for kind, x, y in items:
            if kind == "esc":
                if x == c:
                    match = True
            elif kind == "range":
                start, end, cc = x, y, c
                if start > end:
                    start, end = end, start
                if nocase:
                    start, end, cc = _lower(start), _lower(end), _lower(cc)
                if start <= cc <= end:
                    match = True
            else:
                if (x == c) if not nocase else (_lower(x) == _lower(c)):
                    match = True
        if match != negate:
            accepted.add(b)
    return frozenset(accepted)


def _literal_set(b, nocase):
    if not nocase:
        return frozenset((b,))
    c = _signed(b)
    return frozenset(x for x in range(256) if _lower(_signed(x)) == _lower(c))


def tokenize(pattern, nocase=False):
    """Split ``pattern`` (bytes) into tokens: ``None`` for a run of ``*``,
    else the frozenset of byte values one string byte may be."""
    p = pattern
    n = len(p)
    i = 0
    out = []
    while i < n:
        c = p[i]
        if c == 42:                                   # '*'
            while i + 1 < n and p[i + 1] == 42:
                i += 1
            out.append(_STAR)
        elif c == 63:                                 # '?'
            out.append(_ANY)
        elif c == 91:                                 # '['
            i += 1
            negate = i < n and p[i] == 94             # '^'
            if negate:
                i += 1
            items = []
            while True:
                if i < n and p[i] == 92 and n - i >= 2:          # '\' escape
                    i += 1
                    items.append(("esc", _signed(p[i]), 0))
                elif i < n and p[i] == 93:                       # ']'
                    break
                elif i >= n:
                    i -= 1        # as Redis: the class ends with the pattern
                    break
                elif n - i >= 3 and p[i + 1] == 45:              # 'a-z'
                    items.append(("range", _signed(p[i]), _signed(p[i + 2])))
                    i += 2
                else:
                    items.append(("lit", _signed(p[i]), 0))
                i += 1
            out.append(_class_set(items, negate, nocase))
        else:
            if c == 92 and n - i >= 2:                # '\x'
                i += 1
                c = p[i]
            out.append(_literal_set(c, nocase))
        i += 1
    return out


_ANY = frozenset(range(256))


def _unit_regex(s):
    if s is _ANY or len(s) == 256:
        return b"."
    if not s:
        return b"(?!)"
    if len(s) == 1:
        return re.escape(bytes(s))
    return b"[" + b"".join(re.escape(bytes((b,))) for b in sorted(s)) + b"]"


class GlobPattern:
    """A compiled pattern; call it (or ``.match``) with the bytes to test."""

    __slots__ = ("pattern", "nocase", "match", "_re")

    def __init__(self, pattern, nocase=False):
        if isinstance(pattern, str):
            pattern = pattern.encode()
        self.pattern = bytes(pattern)
        self.nocase = nocase
        self._re = None
        self.match = self._build()

    def __call__(self, s):
        return self.match(s)

    def __repr__(self):
        return f"GlobPattern({self.pattern!r}, nocase={self.nocase})"

    def _build(self):
        pat = self.pattern
        if not pat:
            return lambda s: not s
        toks = tokenize(pat, self.nocase)
        stars = [i for i, t in enumerate(toks) if t is _STAR]
        if len(stars) > _NESTING_LIMIT and stars[_NESTING_LIMIT] != len(toks) - 1:
            return lambda s: False
        plain = all(t is not _STAR and len(t) == 1 for t in toks)
        if plain:
            lit = bytes(next(iter(t)) for t in toks)
            return lit.__eq__
        if (toks[-1] is _STAR and len(stars) == 1
                and all(len(t) == 1 for t in toks[:-1])):
            prefix = bytes(next(iter(t)) for t in toks[:-1])
            if prefix:
                return lambda s: s.startswith(prefix)
            return bool                                 # '*': any non-empty key
        segs = [[]]
        for t in toks:
            if t is _STAR:
                segs.append([])
            else:
                segs[-1].append(_unit_regex(t))
        parts = [b"".join(segs[0])]
        for mid in segs[1:-1]:
            parts.append(b"(?>.*?" + b"".join(mid) + b")")
        if len(segs) > 1:
            parts.append(b".*" + b"".join(segs[-1]))
        self._re = re.compile(b"".join(parts), re.DOTALL)
        full = self._re.fullmatch
        return lambda s: bool(s) and full(s) is not None


_cache = {}


def compile(pattern, nocase=False):  # noqa: A001 - the module's verb, like re.compile
    """A :class:`GlobPattern` for ``pattern`` (cached for repeated patterns)."""
    if isinstance(pattern, str):
        pattern = pattern.encode()
    key = (bytes(pattern), bool(nocase))
    g = _cache.get(key)
    if g is None:
        if len(_cache) >= 256:
            _cache.clear()
        g = _cache[key] = GlobPattern(key[0], key[1])
    return g


def stringmatch(pattern, s, nocase=False):
    """True when ``s`` matches ``pattern`` by Redis's stringmatchlen rules."""
    return compile(pattern, nocase).match(s)


def matches_all(pattern):
    """True for the pattern KEYS and SCAN treat as "every key" (``*``),
    including the empty key, as Redis does."""
    return pattern == b"*" or pattern == "*"


def filter_keys(pattern, keys):
    """KEYS semantics: the keys of ``keys`` that ``pattern`` matches, with
    ``*`` meaning every key (the empty one too), as Redis's KEYS and SCAN."""
    if matches_all(pattern):
        return list(keys)
    return [*filter(compile(pattern).match, keys)]
