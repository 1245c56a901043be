"""Seeded synthetic function-calling tasks in BFCL's categories, with D-CORE-style SFT targets.

A catalogue of ~20 small functions (JSON-schema parameters: string, integer, number, boolean, enum;
required and optional) and, per function, a query template. A sample offers a few functions in the system
prompt and asks for one or more sub-tasks:

- simple: one function offered, one call;
- multiple: 2..max_tools functions offered, one call;
- parallel: one function offered, 2..max_calls calls of it;
- parallel_multiple: 2..max_tools functions offered, 2..max_calls calls of at least two of them;
- irrelevance: no offered function fits (a catalogue task whose function is not offered, or small talk).

Gold answers are BFCL possible answers ``[{"fn": {"arg": [allowed values]}}]`` ("" allowed = optional and
omitted), ``[]`` for irrelevance. The SFT target decomposes the request before calling::

    <think>\\nThe request has 2 sub-tasks.\\n1. Get the weather in Paris: get_weather.\\n2. …\\n</think>\\n\\n[get_weather(city="Paris"), …]

A request for a function that is not offered gets ``1. Get the time in Rome: get_time, not given.`` and a refusal.

Sample ``index`` is a pure function of (seed, index, categories, split); train and held-out samples are
told apart by a hash of query + offered functions, as for the math problems.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tirl.data.synthetic_math import check_split, first_distinct, in_split
from tirl.tools.text_format import with_reasoning

CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance")

CITIES = ("Paris", "Rome", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Boston")
PEOPLE = ("bob", "ann", "tom", "eva", "max")
TOPICS = ("sports", "music", "science", "food", "travel")
TEXTS = ("good morning", "thank you", "see you soon", "where is the bus")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday")
SMALL_TALK = (
    "Tell me a joke.", "Who wrote Hamlet?", "Write a poem about rain.", "How tall is Mount Everest?",
    "Why is the sky blue?", "What is your name?", "Explain how a rainbow forms.", "Say hello in a fun way.",
)
NO_CALL_THINK = "The request has no sub-task that the given functions can do."
NO_CALL_ANSWER = "None of the given functions can help with this request."


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # string | integer | number | boolean (an enum is a string with choices)
    pool: tuple  # values a query may use
    phrase: str = ""  # optional params: text appended to the task, with {v} for the value
    required: bool = True
    enum: bool = False
    default: Any = None
    words: dict = field(default_factory=dict)  # how a value reads in text, e.g. {True: "on"}

    def schema(self) -> dict:
        out: dict[str, Any] = {"type": self.type}
        if self.enum:
            out["enum"] = list(self.pool)
        if not self.required and self.default is not None:
            out["default"] = self.default
        return out

    def text(self, value: Any) -> str:
        return self.words.get(value, str(value))


@dataclass(frozen=True)
class FunctionSpec:
    name: str
    description: str
    task: str  # imperative sub-task with {param} slots for the required params
    params: tuple[Param, ...]

    def tool(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": {
                "type": "object",
                "properties": {p.name: p.schema() for p in self.params},
                "required": [p.name for p in self.params if p.required],
            },
        }


def _req(name: str, type_: str, pool: tuple, **kw) -> Param:
    return Param(name, type_, pool, **kw)


def _opt(name: str, type_: str, pool: tuple, phrase: str, default: Any = None, **kw) -> Param:
    return Param(name, type_, pool, phrase=phrase, required=False, default=default, **kw)


ON_OFF = {True: "on", False: "off"}

CATALOGUE: tuple[FunctionSpec, ...] = (
    FunctionSpec("get_weather", "Current weather in a city.", "get the weather in {city}",
                 (_req("city", "string", CITIES),
                  _opt("units", "string", ("celsius", "fahrenheit"), " in {v}", "celsius", enum=True))),
    FunctionSpec("get_time", "Local time in a city.", "get the time in {city}", (_req("city", "string", CITIES),)),
    FunctionSpec("send_email", "Send an email.", "send an email to {to} about {subject}",
                 (_req("to", "string", PEOPLE), _req("subject", "string", ("lunch", "the report", "a trip")))),
    FunctionSpec("search_books", "Search books by topic.", "search books about {query}",
                 (_req("query", "string", TOPICS), _opt("limit", "integer", (3, 5, 10), ", at most {v}", 10))),
    FunctionSpec("set_alarm", "Set an alarm.", "set an alarm at hour {hour}",
                 (_req("hour", "integer", tuple(range(5, 12))),
                  _opt("minute", "integer", (15, 30, 45), " minute {v}", 0))),
    FunctionSpec("play_song", "Play a song.", "play the song {title}",
                 (_req("title", "string", ("Yellow", "Hello", "Imagine", "Help")),
                  _opt("shuffle", "boolean", (True, False), " with shuffle {v}", False, words=ON_OFF))),
    FunctionSpec("translate", "Translate text.", "translate '{text}' to {lang}",
                 (_req("text", "string", TEXTS), _req("lang", "string", ("french", "spanish", "german"), enum=True))),
    FunctionSpec("get_stock", "Stock price of a company.", "get the stock price of {symbol}",
                 (_req("symbol", "string", ("AAPL", "MSFT", "IBM", "NVDA")),)),
    FunctionSpec("order_food", "Order food.", "order {count} {item}",
                 (_req("item", "string", ("pizzas", "salads", "tacos")), _req("count", "integer", (1, 2, 3, 4)))),
    FunctionSpec("set_light", "Turn a light on or off.", "turn the {room} light {on}",
                 (_req("room", "string", ("kitchen", "bedroom", "office")),
                  _req("on", "boolean", (True, False), words=ON_OFF))),
    FunctionSpec("get_news", "News on a topic.", "get the news about {topic}",
                 (_req("topic", "string", TOPICS), _opt("limit", "integer", (3, 5), ", {v} stories", 10))),
    FunctionSpec("add_event", "Add a calendar event.", "add the event {title} on {day}",
                 (_req("title", "string", ("gym", "dentist", "meeting")), _req("day", "string", DAYS, enum=True))),
    FunctionSpec("find_hotel", "Find a hotel.", "find a hotel in {city}",
                 (_req("city", "string", CITIES), _opt("stars", "integer", (3, 4, 5), " with {v} stars"))),
    FunctionSpec("convert", "Convert money.", "convert {amount} usd to {to}",
                 (_req("amount", "number", (12.5, 40.0, 99.9, 250.0)),
                  _req("to", "string", ("eur", "gbp", "yen"), enum=True))),
    FunctionSpec("calc_tip", "Tip for a bill.", "get the tip on a bill of {bill}",
                 (_req("bill", "number", (20.0, 45.5, 80.0)),
                  _opt("percent", "number", (10.0, 15.0, 20.0), " at {v} percent", 15.0))),
    FunctionSpec("get_route", "Route between places.", "get a route from {start} to {end}",
                 (_req("start", "string", ("home", "work", "school")), _req("end", "string", ("the park", "the zoo")),
                  _opt("mode", "string", ("car", "bike", "walk"), " by {v}", "car", enum=True))),
    FunctionSpec("set_reminder", "Set a reminder.", "remind me to {text} at hour {hour}",
                 (_req("text", "string", ("call mom", "buy milk", "pay rent")),
                  _req("hour", "integer", tuple(range(8, 20))))),
    FunctionSpec("book_ticket", "Book movie tickets.", "book {seats} tickets for {movie}",
                 (_req("movie", "string", ("Up", "Cars", "Jaws", "Alien")), _req("seats", "integer", (1, 2, 3, 4)))),
    FunctionSpec("multiply", "Multiply two numbers.", "multiply {a} by {b}",
                 (_req("a", "number", (3.5, 12.0, 7.25)), _req("b", "number", (2.0, 4.5, 10.0)))),
    FunctionSpec("get_user", "Look up a user.", "get the user with id {user_id}",
                 (_req("user_id", "integer", (17, 42, 108, 256)),)),
)


@dataclass(frozen=True)
class Call:
    fn: FunctionSpec
    args: dict[str, Any]  # in schema order; omitted optionals absent

    def task_text(self) -> str:
        """The sub-task in words, e.g. 'get the weather in Paris in celsius'."""
        values = {p.name: p.text(self.args[p.name]) for p in self.fn.params if p.name in self.args}
        text = self.fn.task.format(**{p.name: values[p.name] for p in self.fn.params if p.required})
        for p in self.fn.params:
            if not p.required and p.name in self.args:
                text += p.phrase.format(v=values[p.name])
        return text

    def gold(self) -> dict:
        """BFCL possible answer of this call: given args exact, omitted optionals "" (or their default)."""
        allowed = {}
        for p in self.fn.params:
            if p.name in self.args:
                allowed[p.name] = [self.args[p.name]]
            else:
                allowed[p.name] = [""] + ([p.default] if p.default is not None else [])
        return {self.fn.name: allowed}


@dataclass(frozen=True)
class ToolTask:
    category: str
    query: str
    tools: tuple[FunctionSpec, ...]  # offered, in prompt order
    calls: tuple[Call, ...]  # gold calls; empty for irrelevance
    missing: tuple[Call, ...] = ()  # irrelevance: the call the request asks for, of a function not offered

    @property
    def key(self) -> str:
        return self.query + "|" + ",".join(f.name for f in self.tools)


def literal(value: Any) -> str:
    """A Python literal for a call argument: strings in double quotes (BFCL style), numbers and bools as repr."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def render_calls(calls: Sequence[Call]) -> str:
    """``[f(a=1), g(b="x")]``; `tirl.tools.calls.parse_calls` reads it back."""
    return "[" + ", ".join(f"{c.fn.name}(" + ", ".join(f"{k}={literal(v)}" for k, v in c.args.items()) + ")"
                           for c in calls) + "]"


def target_text(task: ToolTask) -> str:
    """D-CORE-style SFT target: count the sub-tasks and tie each to the function that does it, then the call list.

    A request for a function that is not offered is decomposed the same way and its sub-task marked
    ``not given`` before the refusal; small talk gets the fixed no-sub-task sentence. Naming the function in the
    reasoning makes "is it offered?" a decision the model writes down, one sub-task at a time.
    """
    if task.missing:
        return with_reasoning(f"{_count(task.missing)}\n{_steps(task.missing, offered=False)}", NO_CALL_ANSWER)
    if not task.calls:
        return with_reasoning(NO_CALL_THINK, NO_CALL_ANSWER)
    return with_reasoning(f"{_count(task.calls)}\n{_steps(task.calls)}", render_calls(task.calls))


def _count(calls: Sequence[Call]) -> str:
    return f"The request has {len(calls)} {'sub-task' if len(calls) == 1 else 'sub-tasks'}."


def _steps(calls: Sequence[Call], offered: bool = True) -> str:
    """``1. Get the time in Rome: get_time.`` (or ``…: get_time, not given.``), one line per sub-task."""
    mark = "" if offered else ", not given"
    return "\n".join(f"{i}. {_capital(c.task_text())}: {c.fn.name}{mark}." for i, c in enumerate(calls, 1))


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _sentence(text: str) -> str:
    return _capital(text) + "."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _random_call(r: random.Random, fn: FunctionSpec, avoid: list[dict]) -> Call:
    """A call of ``fn`` whose arguments differ from every call in ``avoid`` (parallel calls are distinct)."""
    for _ in range(50):
        args = {p.name: r.choice(p.pool) for p in fn.params if p.required or r.random() < 0.5}
        if args not in avoid:
            return Call(fn, args)
    raise RuntimeError(f"Could not draw distinct calls of {fn.name}; its value pools are too small.")


def _draw(r: random.Random, category: str, max_tools: int, max_calls: int) -> ToolTask:
    if category == "irrelevance":
        tools = r.sample(CATALOGUE, r.randint(1, max_tools))
        if r.random() < 0.5:
            absent = r.choice([f for f in CATALOGUE if f not in tools])
            wanted = _random_call(r, absent, [])
            return ToolTask(category, _sentence(wanted.task_text()), tuple(tools), (), (wanted,))
        query = r.choice(SMALL_TALK)
        return ToolTask(category, query, tuple(tools), ())
    if category in ("simple", "parallel"):
        tools = [r.choice(CATALOGUE)]
        used = [tools[0]] * (1 if category == "simple" else r.randint(2, max_calls))
    else:
        tools = r.sample(CATALOGUE, r.randint(2, max_tools))
        if category == "multiple":
            used = [r.choice(tools)]
        else:
            used = r.sample(tools, 2) + [r.choice(tools) for _ in range(r.randint(2, max_calls) - 2)]
            r.shuffle(used)
    calls: list[Call] = []
    for fn in used:
        calls.append(_random_call(r, fn, [c.args for c in calls if c.fn is fn]))
    query = _sentence(_join([c.task_text() for c in calls]))
    return ToolTask(category, query, tuple(tools), tuple(calls))


def check_categories(categories: Sequence[str]) -> tuple[str, ...]:
    categories = tuple(categories)
    bad = [c for c in categories if c not in CATEGORIES]
    if not categories or bad:
        raise ValueError(f"Tool-call categories must be a non-empty subset of {list(CATEGORIES)}, got {list(categories)}.")
    return categories


def task_at(seed: int, index: int, categories: Sequence[str] = CATEGORIES, split: str = "train",
            max_tools: int = 2, max_calls: int = 2) -> ToolTask:
    """Task number ``index`` of the stream; pure, so streams resume anywhere.

    ``max_tools`` bounds the functions offered (>= 2), ``max_calls`` the calls of parallel categories (>= 2):
    both set the prompt and response lengths the tiny model has to handle.
    """
    categories = check_categories(categories)
    check_split(split)
    if max_tools < 2 or max_calls < 2:
        raise ValueError(f"max_tools and max_calls must be at least 2, got {max_tools} and {max_calls}.")
    for attempt in range(10_000):
        rng = random.Random(f"tirl-toolcall:{seed}:{index}:{attempt}")
        task = _draw(rng, rng.choice(categories), max_tools, max_calls)
        if in_split(task.key, split):
            return task
    raise RuntimeError(f"No {split} task found for seed {seed}, index {index}; this is a generator bug.")


def unique_tasks(n: int, seed: int, categories: Sequence[str] = CATEGORIES, split: str = "train",
                 **limits: int) -> list[ToolTask]:
    return first_distinct(n, lambda index: task_at(seed, index, categories, split, **limits), "tool-call tasks")


def toolcall_rl_prompt(task: ToolTask, prompt_id: str) -> dict:
    tools = [f.tool() for f in task.tools]
    return {"id": prompt_id, "task": "toolcall", "messages": [{"role": "user", "content": task.query}], "tools": tools,
            "answer": [c.gold() for c in task.calls], "category": task.category}


def toolcall_sft_sample(task: ToolTask) -> dict:
    tools = [f.tool() for f in task.tools]
    messages = [{"role": "user", "content": task.query}, {"role": "assistant", "content": target_text(task)}]
    return {"task": "toolcall", "messages": messages, "tools": tools, "loss_on": "assistant"}


def make_toolcall_rl_prompts(n: int, seed: int, categories: Sequence[str] = CATEGORIES, split: str = "train",
                             start: int = 0, max_tools: int = 2, max_calls: int = 2) -> list[dict]:
    """Prompts ``start .. start+n-1`` of the stream; held-out sets are de-duplicated."""
    limits = {"max_tools": max_tools, "max_calls": max_calls}
    if split == "heldout":
        tasks = unique_tasks(start + n, seed, categories, split, **limits)[start:]
    else:
        tasks = [task_at(seed, i, categories, split, **limits) for i in range(start, start + n)]
    return [toolcall_rl_prompt(t, f"toolcall-{split}-{seed}-{start + i}") for i, t in enumerate(tasks)]


def make_toolcall_sft_samples(n: int, seed: int, categories: Sequence[str] = CATEGORIES, split: str = "train",
                              max_tools: int = 2, max_calls: int = 2) -> list[dict]:
    """The first ``n`` tasks of the stream as SFT samples, with decomposition reasoning and the gold call list.

    Drawn like the RL prompts, repeats included, so the categories keep their shares. (Keeping only distinct tasks
    skews the mix towards the categories with the most distinct tasks: ``simple`` has about 300,
    ``parallel_multiple`` tens of thousands. A warm checkpoint built that way declined two single requests in three,
    because it could not yet tell a request for an offered function from one for a missing function.)
    """
    limits = {"max_tools": max_tools, "max_calls": max_calls}
    return [toolcall_sft_sample(task_at(seed, i, categories, split, **limits)) for i in range(n)]
