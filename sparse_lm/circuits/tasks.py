"""Binary next-token tasks on Python code (docs/method.md §5), for measuring circuits.

A datapoint is a pair of contexts A and B that differ in one place; after A the right next token is `a`, after
B it is `b`. Each task tests one mechanism (closing the right quote, counting brackets, remembering a
variable's type, ...) and is written as at least three template families: the same question in different code
(other prefixes, call shapes, nesting), with the same answers. Templates are filled with seeded random identifiers
and literals. Splits: `train` uses every family but the last, with identifiers from one half of the pools; `test`
the same families with identifiers from the other half; `unseen` only the last family, with test identifiers, so a
circuit that fits its training templates rather than the task shows it there.

Every datapoint is written as context + the code that really follows. The answer is the first token of that
continuation under the checkpoint's tokenizer (BPE merges punctuation runs, so `")` may become `")\\n`). A task
is usable with a tokenizer when the context's tokens are a prefix of context + continuation, and every A side
shares one answer token, every B side another; otherwise `build` fails naming the task and the answers.
A and B end in the same token wherever the template allows, so the bigram table alone cannot tell them apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

from sparse_lm.errors import UserError

# Identifier pools: train and test draw from disjoint halves.
NAMES = (
    "data items result value count total buf node path key name text line row col item entry record queue stack "
    "cache seen parts chunk block token word msg args opts conf state values lines names rows cols blocks tokens "
    "words nodes paths keys pairs files fields rules tasks jobs users groups tags labels points edges frames events "
    "out acc res tmp src dst lst arr seq coll bag pool heap index offset width height size limit step"
).split()
FUNCS = "parse load build update check render collect merge split fetch store apply scan walk emit flush read write join sort".split()
CLASSES = "Parser Loader Builder Config Node Reader Writer Cache Queue Buffer Record Table Entry Report Handler Worker".split()
WORDS = "hello world error done start stop ready value name file data line path user item node text".split()


def _pool(names: list[str], split: str) -> list[str]:
    """Deterministic halves of a name list: even positions for train, odd for test."""
    return names[0::2] if split == "train" else names[1::2]


@dataclass
class Fill:
    """The random pieces of one datapoint."""

    rng: random.Random
    split: str

    def name(self, *avoid: str) -> str:
        while (n := self.rng.choice(_pool(NAMES, self.split))) in avoid:
            pass
        return n

    def func(self) -> str:
        return self.rng.choice(_pool(FUNCS, self.split))

    def cls(self) -> str:
        return self.rng.choice(_pool(CLASSES, self.split))

    def num(self) -> str:
        return str(self.rng.randint(0, 99))

    def words(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(1, 3)))


# A family returns ((context A, continuation A), (context B, continuation B)); a task is a tuple of at least three
# families that pose the same question in different code (prefixes, call shapes, nesting), with the same answers.
Pair = tuple[tuple[str, str], tuple[str, str]]
Family = Callable[[Fill], Pair]


def top(f: Fill, line: str) -> str:
    return line


def in_function(f: Fill, line: str) -> str:
    """The line as the body of a function with an argument."""
    return f"def {f.func()}({f.name()}):\n    {line}"


def in_method_branch(f: Fill, line: str) -> str:
    """The line two blocks deep in a method of a class (never used in training: the unseen family of one-line tasks)."""
    return f"class {f.cls()}:\n    def {f.func()}(self):\n        if self.{f.name()}:\n            {line}"


def one_line(make: Callable[[Fill], tuple[str, str, str, str]]) -> tuple[Family, ...]:
    """Three families of a task whose contexts are one statement (A, continuation A, B, continuation B): at top level,
    in a function body, and in a branch of a method."""

    def family(place):
        def fn(f: Fill) -> Pair:
            ca, na, cb, nb = make(f)
            prefix = place(f, "")
            return (prefix + ca, na), (prefix + cb, nb)

        fn.__name__ = place.__name__
        return fn

    return family(top), family(in_function), family(in_method_branch)


# ---- one-statement tasks: the deciding token sits earlier in the line than its last token


def _quote(f: Fill):
    v, fn, w = f.name(), f.func(), f.words()
    shape = f.rng.choice([f"{v} = {fn}(", f"{fn}(", f"{v}.{fn}({f.num()}, ", f"print({v}, "])
    return f'{shape}"{w}', '")\n', f"{shape}'{w}", "')\n"


def _brackets(f: Fill):
    v, a, b, c, d = f.name(), f.num(), f.num(), f.num(), f.num()
    head = f.rng.choice([f"{v} = ", f"{v}: list = ", "return ", f"{v} += "])
    return f"{head}[[{a}, {b}], [{c}, {d}", "]]\n", f"{head}[{a}, {b}, {c}, {d}", "]\n"


def _parens(f: Fill):
    v, g, h, a = f.name(), f.func(), f.func(), f.name()
    head = f.rng.choice([f"{v} = ", "return ", f"{v}.{f.name(v)} = ", "yield "])
    return f"{head}{g}({h}({a}", "))\n", f"{head}{g}({a}", ")\n"


def _dict_key(f: Fill):
    d, k, n = f.name(), f.name(), f.num()
    target = f.rng.choice([d, f"{d}[{n}]", f"self.{d}", f"{d}.{k}"])
    return f'{target}["{k}', f'"] = {n}\n', f"{target}['{k}", f"'] = {n}\n"


def _dict_or_list(f: Fill):
    v, a, b = f.name(), f.num(), f.num()
    head = f.rng.choice([f"{v} = ", f"return {v} or ", f"{v}.{f.name(v)} = "])
    return f"{head}{{{a}", f": {b}}}\n", f"{head}[{a}", f", {b}]\n"


def _tuple_or_list(f: Fill):
    v, a, b, c = f.name(), f.num(), f.num(), f.num()
    head = f.rng.choice([f"{v} = ", f"return {v} or ", f"{v}.{f.name(v)} = "])
    return f"{head}({a}, {b}, {c}", ")\n", f"{head}[{a}, {b}, {c}", "]\n"


def _set_or_list(f: Fill):
    v, a, b, c = f.name(), f.num(), f.num(), f.num()
    head = f.rng.choice([f"{v} = ", f"return {v} or ", f"{v}.{f.name(v)} = "])
    return f"{head}{{{a}, {b}, {c}", "}\n", f"{head}[{a}, {b}, {c}", "]\n"


def _triple_quote(f: Fill):
    v, w = f.name(), f.words()
    head = f.rng.choice([f"{v} = ", f"return {v} or ", f"{v}.{f.name(v)} = "])
    return f'{head}"""{w}', '"""\n', f'{head}"{w}', '"\n'


def _unpacking(f: Fill):
    k = f.name()
    v = f.name(k)
    d = f.name(k, v)
    src = f.rng.choice([d, f"self.{d}", f"{f.name(k, v, d)}.{d}"])
    return f"for {k}, {v} in {src}", ".items():\n", f"for {k} in {src}", ":\n"


# ---- multi-line tasks: each family written out


LOOPS = (
    lambda f, v, it, src: f"for {it} in {src}:\n    ",
    lambda f, v, it, src: f"for {it} in {f.func()}({src}):\n    if {it}:\n        ",
    lambda f, v, it, src: f"{it} = {f.func()}({src})\n",
)


def while_pop(f: Fill, v: str, it: str, src: str) -> str:
    return f"while {src}:\n    {it} = {src}.pop()\n    "


def accumulator(make_a: str, make_b: str, use_a: str, use_b: str, loop, var: str | None = None) -> Family:
    """`v = make_a` (A) or `v = make_b` (B), some code (`loop`), then `v` used as its type wants: `use_a` / `use_b`,
    formatted with the item `it` the code produced."""

    def fn(f: Fill) -> Pair:
        v = var or f.name()
        it = f.name(v)
        src = f.name(v, it)
        body = loop(f, v, it, src)
        return (f"{v} = {make_a}\n{body}{v}", use_a.format(it=it)), (f"{v} = {make_b}\n{body}{v}", use_b.format(it=it))

    return fn


def set_or_string_families(var: str | None) -> tuple[Family, ...]:
    return tuple(accumulator("set()", '""', ".add({it})\n", " += {it}\n", loop, var) for loop in (*LOOPS[:2], while_pop))


def _self_attribute(body: Callable[[Fill], str]) -> Family:
    def fn(f: Fill) -> Pair:
        c, x = f.cls(), f.name()
        tail = body(f)
        head = f"class {c}:\n    def __init__(self, {x}):\n        self."
        return (f"{head}name = {x}{tail}", ".name\n"), (f"{head}value = {x}{tail}", ".value\n")

    return fn


def _return_annotation(shape: Callable[[Fill, str], tuple[str, str]]) -> Family:
    def fn(f: Fill) -> Pair:
        fn_, x = f.func(), f.name()
        args, body = shape(f, x)
        return ((f"def {fn_}({args}) -> bool:\n{body}", " True\n"), (f"def {fn_}({args}) -> str:\n{body}", f" str({x})\n"))

    return fn


def _cond(f: Fill, x: str) -> str:
    return f.rng.choice([x, f"not {x}", f"{x} is None", f"{x} in {f.name(x)}"])


def _indent_after(opener: Callable[[Fill, str], str]) -> Family:
    def fn(f: Fill) -> Pair:
        fn_, x = f.func(), f.name()
        y = f.name(x)
        note = f"  # {f.words()}\n"  # both lines end in a comment: the same last token, the opener is further back
        return ((f"def {fn_}({x}):\n    {opener(f, x)}:{note}", f"        return {x}\n"),
                (f"def {fn_}({x}):\n    {y} = {x}{note}", f"    return {y}\n"))

    return fn


def _classmethod(before: Callable[[Fill], str]) -> Family:
    def fn(f: Fill) -> Pair:
        c, m, x = f.cls(), f.func(), f.name()
        head = f"class {c}:\n{before(f)}"
        return (f"{head}    @classmethod\n    def {m}", f"(cls, {x}):\n"), (f"{head}    def {m}", f"(self, {x}):\n")

    return fn


def _first_arg(shape: Callable[[Fill, str], str]) -> Family:
    """Inside a method, `return` is followed by its first argument, self or cls, named in the method's signature."""

    def fn(f: Fill) -> Pair:
        c, m, x = f.cls(), f.func(), f.name()
        body = shape(f, x)
        return ((f"class {c}:\n    @classmethod\n    def {m}(cls, {x}):\n{body}        return", " cls\n"),
                (f"class {c}:\n    def {m}(self, {x}):\n{body}        return", " self\n"))

    return fn


def _open_mode(shape: Callable[[Fill, str, str], str]) -> Family:
    def fn(f: Fill) -> Pair:
        p = f.name()
        h = f.name(p)
        return ((shape(f, f'open({p}, "r")', h), ".read()\n"), (shape(f, f'open({p}, "w")', h), f".write({p})\n"))

    return fn


def _increment(loop: Callable[[Fill, str, str, str], str]) -> Family:
    def fn(f: Fill) -> Pair:
        v = f.name()
        it = f.name(v)
        src = f.name(v, it)
        body = loop(f, v, it, src)
        return (f'{v} = ""\n{body}{v} +=', f' "{f.words()}"\n'), (f"{v} = 0\n{body}{v} +=", f" len({it})\n")

    return fn


TASKS: dict[str, tuple[Family, ...]] = {
    "single_double_quote": one_line(_quote),
    "bracket_counting": one_line(_brackets),
    "set_or_string": set_or_string_families(None),
    "set_or_string_fixedvarname": set_or_string_families("x"),
    "paren_depth": one_line(_parens),
    "list_or_dict_use": tuple(accumulator("[]", "{}", ".append({it})\n", "[{it}] = 1\n", loop) for loop in LOOPS),
    "self_attribute_recall": (
        _self_attribute(lambda f: f"\n\n    def {f.func()}(self):\n        return self"),
        _self_attribute(lambda f: f"\n\n    @property\n    def {f.func()}(self):\n        return self"),
        _self_attribute(lambda f: f"\n\n    def {f.func()}(self, {f.name()}):\n        if self:\n            return self"),
    ),
    "return_annotation": (
        _return_annotation(lambda f, x: (x, f"    if {_cond(f, x)}:\n        return")),
        _return_annotation(lambda f, x: (f"{x}, {f.name(x)}", f"    if {_cond(f, x)}:\n        return")),
        _return_annotation(lambda f, x: (x, f"    for {f.name(x)} in {x}:\n        if {_cond(f, x)}:\n            return")),
    ),
    "indent_after_block": (
        _indent_after(lambda f, x: f"if {x}"),
        _indent_after(lambda f, x: f"for {f.name(x)} in {x}"),
        _indent_after(lambda f, x: f"while {x}"),
    ),
    "dict_key_quote": one_line(_dict_key),
    "classmethod_first_arg": (
        _classmethod(lambda f: f"    {f.name()} = {f.num()}\n\n"),
        _classmethod(lambda f: f'    """{f.words()}."""\n\n'),
        _classmethod(lambda f: f"    def __init__(self, {f.name()}):\n        pass\n\n"),
    ),
    "dict_or_list_literal": one_line(_dict_or_list),
    "loop_unpacking": one_line(_unpacking),
    "tuple_or_list_close": one_line(_tuple_or_list),
    "set_or_list_close": one_line(_set_or_list),
    "triple_quote_close": one_line(_triple_quote),
    "int_or_list_accumulate": tuple(accumulator("0", "[]", " += {it}\n", ".append({it})\n", loop) for loop in LOOPS),
    "first_arg_recall": (
        _first_arg(lambda f, x: ""),
        _first_arg(lambda f, x: f"        {f.name(x)} = {x}\n"),
        _first_arg(lambda f, x: f"        if not {x}:\n            {x} = {f.num()}\n"),
    ),
    "open_mode_read_write": (
        _open_mode(lambda f, call, h: f"with {call} as {h}:\n    {h}"),
        _open_mode(lambda f, call, h: f"def {f.func()}():\n    with {call} as {h}:\n        {h}"),
        _open_mode(lambda f, call, h: f"{h} = {call}\n{h}"),
    ),
    "string_or_number_increment": tuple(_increment(loop) for loop in LOOPS),
}
UNSEEN = -1  # the family index held out of training: the held-out "unseen" split uses only it


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Pair]:
    """n distinct datapoints of `task`: `train` and `test` draw from the task's seen families (all but the last) with
    the train or test identifier pool; `unseen` from the held-out family, with the test pool."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if split not in ("train", "test", "unseen"):
        raise ValueError(f"split {split!r}: train, test or unseen")
    families = TASKS[task][UNSEEN:] if split == "unseen" else TASKS[task][:UNSEEN]
    rng = random.Random(f"{task}/{split}/{seed}")
    fill, seen, out = Fill(rng, "train" if split == "train" else "test"), set(), []
    for i in range(50 * n):
        pair = families[i % len(families)](fill)
        contexts = (pair[0][0], pair[1][0])
        if contexts not in seen:  # distinct contexts, not just distinct continuations
            seen.add(contexts)
            out.append(pair)
            if len(out) == n:
                return out
    return out  # a task with fewer distinct fillings than asked


class TaskTokenError(UserError):
    pass


@dataclass
class TaskData:
    """Token ids of one task's split: contexts A then B, right-padded, with each context's length."""

    name: str
    answers: tuple[int, int]  # token ids of a and b
    answer_text: tuple[str, str]
    tokens: torch.Tensor  # [2n, T] (A sides first, then B sides)
    lengths: torch.Tensor  # [2n]

    @property
    def n_pairs(self) -> int:
        return self.tokens.shape[0] // 2

    def select(self, pairs: torch.Tensor) -> TaskData:
        """The given pairs (indices into the A sides), A sides first again."""
        idx = torch.cat([pairs, self.n_pairs + pairs])
        return TaskData(self.name, self.answers, self.answer_text, self.tokens[idx], self.lengths[idx])

    def token_ids(self) -> list[int]:
        """The distinct tokens of all contexts (padding excluded)."""
        return sorted({t for row, n in zip(self.tokens.tolist(), self.lengths.tolist()) for t in row[:n]})

    def halves(self) -> tuple[TaskData, TaskData]:
        """The first and the second half of the pairs."""
        half = self.n_pairs // 2
        return self.select(torch.arange(half)), self.select(torch.arange(half, self.n_pairs))

    def subset(self, n: int) -> TaskData:
        return self.select(torch.arange(min(n, self.n_pairs)))


def build(task: str, tokenizer, split: str, n: int, seed: int = 0, pad_id: int = 0, max_len: int | None = None) -> TaskData:
    """Tokenize a split (train, test or unseen), checking that its answers are single, different tokens for this
    tokenizer and, given `max_len` (the model's context), that every context fits."""
    pairs = generate(task, split, n, seed)
    seqs, found = [], ([], [])
    for pair in pairs:
        for side, (context, continuation) in enumerate(pair):
            ctx = tokenizer.encode(context).ids
            full = tokenizer.encode(context + continuation).ids
            if full[: len(ctx)] != ctx:
                raise TaskTokenError(
                    f"task {task}: the context {context[-20:]!r} does not keep its tokens when followed by "
                    f"{continuation!r} (a merge across the boundary); this tokenizer cannot pose the task"
                )
            seqs.append(ctx)
            found[side].append(full[len(ctx)])
    answers = tuple(sorted(set(side)) for side in found)
    if len(answers[0]) != 1 or len(answers[1]) != 1 or answers[0] == answers[1]:
        names = [[tokenizer.id_to_token(i) for i in side] for side in answers]
        raise TaskTokenError(f"task {task}: answers must be one token per side and differ, got A={names[0]} B={names[1]}")
    longest = max(len(seq) for seq in seqs)
    if max_len is not None and longest > max_len:
        raise TaskTokenError(f"task {task}: its {split} contexts run to {longest} tokens, longer than the model's context "
                             f"(model.ctx_len={max_len})")
    a, b = answers[0][0], answers[1][0]
    ordered = seqs[0::2] + seqs[1::2]  # A sides, then B sides
    lengths = torch.tensor([len(s) for s in ordered])
    tokens = torch.full((len(ordered), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(ordered):
        tokens[i, : len(s)] = torch.tensor(s)
    return TaskData(task, (a, b), (tokenizer.decode([a]), tokenizer.decode([b])), tokens, lengths)
