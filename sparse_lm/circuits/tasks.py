"""Binary next-token tasks on Python code (docs/method.md §5), for measuring circuits.

A datapoint is a pair of contexts A and B that differ in one place; after A the right next token is `a`, after
B it is `b`. Each task tests one mechanism (closing the right quote, counting brackets, remembering a
variable's type, ...). Contexts come from templates filled with seeded random identifiers and literals; the
held-out test split draws its identifiers from a disjoint pool, so no test name was seen in training.

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


# Each generator returns ((context A, continuation A), (context B, continuation B)).
Pair = tuple[tuple[str, str], tuple[str, str]]


def single_double_quote(f: Fill) -> Pair:
    v, fn, w = f.name(), f.func(), f.words()
    return (f'{v} = {fn}("{w}', '")\n'), (f"{v} = {fn}('{w}", "')\n")


def bracket_counting(f: Fill) -> Pair:
    v, a, b, c, d = f.name(), f.num(), f.num(), f.num(), f.num()
    return (f"{v} = [[{a}, {b}], [{c}, {d}", "]]\n"), (f"{v} = [{a}, {b}, {c}, {d}", "]\n")


def _set_or_string(var: str, f: Fill) -> Pair:
    it = f.name(var)
    src = f.name(var, it)
    loop = f"for {it} in {src}:\n    {var}"
    return (f"{var} = set()\n{loop}", f".add({it})\n"), (f'{var} = ""\n{loop}', f" += {it}\n")


def set_or_string(f: Fill) -> Pair:
    return _set_or_string(f.name(), f)


def set_or_string_fixedvarname(f: Fill) -> Pair:
    return _set_or_string("x", f)


def paren_depth(f: Fill) -> Pair:
    v, g, h, a = f.name(), f.func(), f.func(), f.name()
    return (f"{v} = {g}({h}({a}", "))\n"), (f"{v} = {g}({a}", ")\n")


def list_or_dict_use(f: Fill) -> Pair:
    v = f.name()
    it = f.name(v)
    src = f.name(v, it)
    loop = f"for {it} in {src}:\n    {v}"
    return (f"{v} = []\n{loop}", f".append({it})\n"), (f"{v} = {{}}\n{loop}", f"[{it}] = 1\n")


def self_attribute_recall(f: Fill) -> Pair:
    c, x, m = f.cls(), f.name(), f.func()
    body = f"\n\n    def {m}(self):\n        return self"
    return (
        (f"class {c}:\n    def __init__(self, {x}):\n        self.name = {x}{body}", ".name\n"),
        (f"class {c}:\n    def __init__(self, {x}):\n        self.value = {x}{body}", ".value\n"),
    )


def return_annotation(f: Fill) -> Pair:
    fn, x = f.func(), f.name()
    cond = f.rng.choice([x, f"not {x}", f"{x} is None", f"{x} in {f.name(x)}"])
    return (
        (f"def {fn}({x}) -> bool:\n    if {cond}:\n        return", " True\n"),
        (f"def {fn}({x}) -> str:\n    if {cond}:\n        return", f" str({x})\n"),
    )


def indent_after_block(f: Fill) -> Pair:
    fn, x = f.func(), f.name()
    y = f.name(x)
    note = f"  # {f.words()}\n"  # both lines end in a comment: the same last token, the block opener is further back
    return (
        (f"def {fn}({x}):\n    if {x}:{note}", f"        return {x}\n"),
        (f"def {fn}({x}):\n    {y} = {x}{note}", f"    return {y}\n"),
    )


def dict_key_quote(f: Fill) -> Pair:
    d, k, n = f.name(), f.name(), f.num()
    return (f'{d}["{k}', f'"] = {n}\n'), (f"{d}['{k}", f"'] = {n}\n")


def classmethod_first_arg(f: Fill) -> Pair:
    c, m, x = f.cls(), f.func(), f.name()
    head = f"class {c}:\n"
    return (f"{head}    @classmethod\n    def {m}", f"(cls, {x}):\n"), (f"{head}    def {m}", f"(self, {x}):\n")


def dict_or_list_literal(f: Fill) -> Pair:
    v, a, b = f.name(), f.num(), f.num()
    return (f"{v} = {{{a}", f": {b}}}\n"), (f"{v} = [{a}", f", {b}]\n")


def loop_unpacking(f: Fill) -> Pair:
    k = f.name()
    v = f.name(k)
    d = f.name(k, v)
    return (f"for {k}, {v} in {d}", ".items():\n"), (f"for {k} in {d}", ":\n")


TASKS: dict[str, Callable[[Fill], Pair]] = {
    fn.__name__: fn
    for fn in (
        single_double_quote, bracket_counting, set_or_string, set_or_string_fixedvarname, paren_depth,
        list_or_dict_use, self_attribute_recall, return_annotation, indent_after_block, dict_key_quote,
        classmethod_first_arg, dict_or_list_literal, loop_unpacking,
    )
}


def generate(task: str, split: str, n: int, seed: int = 0) -> list[Pair]:
    """n distinct datapoints of `task` from the train or test identifier pool."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(f"{task}/{split}/{seed}")
    fill, seen, out = Fill(rng, split), set(), []
    for _ in range(50 * n):
        pair = TASKS[task](fill)
        if pair not in seen:
            seen.add(pair)
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

    def subset(self, n: int) -> TaskData:
        return self.select(torch.arange(min(n, self.n_pairs)))


def build(task: str, tokenizer, split: str, n: int, seed: int = 0, pad_id: int = 0) -> TaskData:
    """Tokenize a task split, checking that its answers are single, different tokens for this tokenizer."""
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
    a, b = answers[0][0], answers[1][0]
    ordered = seqs[0::2] + seqs[1::2]  # A sides, then B sides
    lengths = torch.tensor([len(s) for s in ordered])
    tokens = torch.full((len(ordered), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(ordered):
        tokens[i, : len(s)] = torch.tensor(s)
    return TaskData(task, (a, b), (tokenizer.decode([a]), tokenizer.decode([b])), tokens, lengths)
