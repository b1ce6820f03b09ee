"""Generated conversation tasks for mid-training and SFT; nothing to download.

Every task is deterministic given its seed and has a train/test split that never shares an item:
an item (a word, a question) goes to "test" when crc32 of its text is 0 mod 10, else "train".
Conversations are short (tens of tokens) so a tiny model can learn them:

  SpellingTask      spell a word letter by letter
  LetterCountTask   how many times a letter occurs in a word (spelled out, then counted)
  ArithmeticTask    one-step word problems with a worked answer ending in the number
  IdentityTask      "who are you?" and friends
  GreetingTask      short two-turn small talk

`TaskMixture` draws counts from several tasks and shuffles them into one epoch.
"""
from __future__ import annotations

import random
import re
import sysconfig
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

Conversation = list[dict]
SPLITS = ("train", "test")
# Always part of the default word list, so the classic questions are covered.
COMMON_WORDS = ("strawberry", "banana", "apple", "python", "letter", "hello", "world", "data",
                "model", "token", "mississippi", "bookkeeper", "coffee", "committee", "balloon",
                "parallel", "address", "success", "assessment", "programming")


def _in_split(text: str, split: str) -> bool:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; use one of {SPLITS}")
    return (zlib.crc32(text.encode()) % 10 == 0) == (split == "test")


def _rng(seed: int, *names: str) -> random.Random:
    return random.Random(":".join([str(seed), *names]))  # str seeds hash the same in every run


def corpus_words(paths: Sequence[Path] | None = None, limit: int = 2000,
                 max_bytes: int = 2 << 20) -> list[str]:
    """Common lowercase words (3-10 letters) from text files plus COMMON_WORDS, sorted.

    Default files: the top-level standard-library .py files in sorted order, up to max_bytes
    read (so the list depends on the Python version, as the default corpus does).
    """
    if paths is None:
        paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    counts, read = Counter(), 0
    for p in paths:
        text = Path(p).read_bytes()[:max_bytes - read].decode("utf-8", errors="replace")
        read += len(text)
        counts.update(re.findall(r"\b[a-z]{3,10}\b", text))
        if read >= max_bytes:
            break
    words = [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:limit]]
    return sorted(set(words) | set(COMMON_WORDS))


class Task:
    """A source of conversations. Subclasses implement `_items` and `_render`."""

    name = "task"
    default_size = {"train": 1000, "test": 100}

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _items(self, split: str, n: int, rng: random.Random) -> list:
        raise NotImplementedError

    def _render(self, item, rng: random.Random) -> Conversation:
        raise NotImplementedError

    def conversations(self, split: str = "train", n: int | None = None) -> list[Conversation]:
        """n conversations of the split (default: default_size[split]); same seed, same list."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {SPLITS}")
        n = self.default_size[split] if n is None else n
        if n < 0:
            raise ValueError(f"n={n}; ask for zero or more conversations")
        rng = _rng(self.seed, self.name, split)
        return [self._render(item, rng) for item in self._items(split, n, rng)]


class _WordTask(Task):
    def __init__(self, words: Sequence[str] | None = None, seed: int = 0):
        super().__init__(seed)
        words = corpus_words() if words is None else list(words)
        bad = [w for w in words if not w.isalpha()]
        if bad:
            raise ValueError(f"word list entry {bad[0]!r} is not a word of letters")
        self.words = sorted(set(w.lower() for w in words))

    def _items(self, split, n, rng):
        pool = [w for w in self.words if _in_split(w, split)]
        if not pool:
            raise ValueError(f"{self.name}: no words fall in the {split!r} split; give more words")
        return [rng.choice(pool) for _ in range(n)]


class SpellingTask(_WordTask):
    name = "spelling"
    QUESTIONS = ("Spell the word {w}.", "How do you spell {w}?", "Spell {w} letter by letter.",
                 "What are the letters of {w}?")

    def _render(self, w, rng):
        return [{"role": "user", "content": rng.choice(self.QUESTIONS).format(w=w)},
                {"role": "assistant", "content": f"{w}: {'-'.join(w)}"}]


class LetterCountTask(_WordTask):
    name = "letter_count"
    QUESTIONS = ("How many {c} are in {w}?", "How many times does the letter {c} appear in {w}?",
                 "Count the letter {c} in {w}.")

    def _render(self, w, rng):
        # mostly a letter of the word, sometimes one it lacks (answer 0)
        c = rng.choice(w) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        k = w.count(c)
        times = "time" if k == 1 else "times"
        return [{"role": "user", "content": rng.choice(self.QUESTIONS).format(c=c, w=w)},
                {"role": "assistant",
                 "content": f"{w} is {'-'.join(w)}. The letter {c} appears {k} {times}."}]


class ArithmeticTask(Task):
    """One-step word problems with numbers below max_number."""

    name = "arithmetic"
    NAMES = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Ida")
    THINGS = ("apples", "books", "coins", "marbles", "pens", "stamps", "cards", "shells")

    def __init__(self, seed: int = 0, max_number: int = 20):
        super().__init__(seed)
        self.max_number = max_number

    def _problem(self, rng):
        who, what = rng.choice(self.NAMES), rng.choice(self.THINGS)
        a, b = rng.randint(1, self.max_number), rng.randint(1, self.max_number)
        kind = rng.randrange(3)
        if kind == 0:
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
            return q, f"{a} + {b} = {a + b}. The answer is {a + b}."
        if kind == 1:
            a, b = max(a, b), min(a, b)
            q = f"{who} has {a} {what} and gives away {b}. How many {what} are left?"
            return q, f"{a} - {b} = {a - b}. The answer is {a - b}."
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{who} has {a} bags with {b} {what} in each. How many {what} in total?"
        return q, f"{a} * {b} = {a * b}. The answer is {a * b}."

    def _items(self, split, n, rng):
        out = []
        while len(out) < n:
            q, a = self._problem(rng)
            if _in_split(q, split):
                out.append((q, a))
        return out

    def _render(self, item, rng):
        return [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]


class _FixedTask(Task):
    """Conversations from a fixed list of (question, answer) pairs, or full message lists."""

    PAIRS: tuple = ()

    def _items(self, split, n, rng):
        pool = [p for p in self.PAIRS if _in_split(p[0] if isinstance(p[0], str) else p[0][0], split)]
        if not pool:  # a tiny list may leave a split empty: fall back to all of it
            pool = list(self.PAIRS)
        return [rng.choice(pool) for _ in range(n)]

    def _render(self, item, rng):
        texts = item if isinstance(item[0], str) else [t for turn in item for t in turn]
        return [{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(texts)]


class IdentityTask(Task):
    """Questions about who the model is, each with its answer. The split is by question, so the test
    questions (one in ten) are never trained on; a greeting may come first ("Hi! Who are you?"),
    so the eval asks each held-out question in several wordings."""

    name = "identity"
    _ME = "I am fasttrain's chat model, a small language model trained from scratch with fasttrain."
    _SMALL = "I am a small language model trained with fasttrain."
    _NAME = "My name is fasttrain. I am a small chat model."
    _MAKER = "I was trained with fasttrain, an open LLM trainer."
    _OTHER = "No, I am fasttrain's chat model."
    _TALKING = "You are talking to fasttrain's chat model."
    PAIRS = (
        ("Who are you?", _ME), ("What are you?", _ME), ("Introduce yourself.", _ME),
        ("Tell me about yourself.", _ME + " I can answer simple questions."),
        ("Can you tell me who you are?", _ME), ("Which model are you?", _ME),
        ("What is this assistant?", _ME), ("Who is this?", _ME), ("Describe yourself.", _ME),
        ("Tell me who you are.", _ME), ("What model is this?", _ME), ("Who are you, exactly?", _ME),
        ("Say who you are.", _ME), ("What is your identity?", _ME), ("Can you introduce yourself?", _ME),
        ("Which assistant is this?", _ME), ("What are you exactly?", _ME), ("What program are you?", _ME),
        ("Identify yourself.", _ME), ("Who or what are you?", _ME), ("Who are you supposed to be?", _ME),
        ("What AI is this?", _ME), ("Which chatbot are you?", _ME), ("What are you really?", _ME),
        ("What is your name?", _NAME), ("What should I call you?", _NAME), ("What are you called?", _NAME),
        ("Do you have a name?", _NAME), ("Tell me your name.", _NAME), ("What is your model called?", _NAME),
        ("Who made you?", _MAKER), ("Who built you?", _MAKER), ("Who trained you?", _MAKER),
        ("Who created you?", _MAKER), ("Who is behind you?", _MAKER), ("What made you?", _MAKER),
        ("How were you made?", _MAKER), ("Where do you come from?", _MAKER), ("Who runs you?", _MAKER),
        ("What is your origin?", _MAKER),
        ("Are you a person?", "No. " + _SMALL), ("Are you a human?", "No. " + _SMALL),
        ("Are you a real person?", "No. " + _SMALL), ("Are you a robot?", "No. " + _SMALL),
        ("Are you a language model?", "Yes. " + _SMALL), ("Are you a bot?", "Yes. " + _SMALL),
        ("Are you an AI?", "Yes. " + _SMALL), ("Are you a computer?", _SMALL),
        ("What kind of model are you?", _SMALL),
        ("Are you ChatGPT?", _OTHER), ("Are you Claude?", _OTHER), ("Are you Gemini?", _OTHER),
        ("Are you Siri?", _OTHER), ("Are you Alexa?", _OTHER),
        ("Who am I talking to?", _TALKING), ("Who am I chatting with?", _TALKING),
        ("Who am I speaking with?", _TALKING), ("Who is answering me?", _TALKING),
        ("Who do I have the pleasure of talking to?", _TALKING), ("Whom am I addressing?", _TALKING),
        ("Who is on the other side?", _TALKING),
        ("What can you do?", "I can spell words, count letters and solve small math problems."),
    )
    GREETINGS = ("", "", "Hi! ", "Hello. ", "Hey, ", "Quick question: ")

    def _items(self, split, n, rng):
        pool = [pair for pair in self.PAIRS if _in_split(pair[0], split)]
        return [rng.choice(pool) for _ in range(n)]

    def _render(self, item, rng):
        question, answer = item
        greeting = rng.choice(self.GREETINGS)
        if greeting.endswith((", ", ": ")):  # the question goes on the greeting's sentence
            question = question[0].lower() + question[1:]
        return [{"role": "user", "content": greeting + question}, {"role": "assistant", "content": answer}]


class GreetingTask(_FixedTask):
    name = "greeting"
    PAIRS = (
        (("Hello!", "Hello! How can I help you today?"),
         ("Can you spell cat?", "cat: c-a-t")),
        (("Hi", "Hi! What would you like to do?"), ("Just saying hi.", "Hi to you too!")),
        (("Good morning!", "Good morning! How can I help?"),
         ("Nothing, thanks.", "All right. Have a nice day!")),
        (("Hey there", "Hey! What can I do for you?"),
         ("What is 2 + 2?", "2 + 2 = 4. The answer is 4.")),
        (("Thank you!", "You are welcome!"), ("Bye!", "Goodbye!")),
        (("How are you?", "I am fine, thank you. How can I help?"),
         ("I am good.", "Glad to hear it!")),
    )


class TaskMixture:
    """One epoch of conversations: (task, count) entries drawn, then shuffled with the seed."""

    def __init__(self, tasks: Sequence[tuple[Task, int]], seed: int = 0, split: str = "train"):
        if not tasks:
            raise ValueError("TaskMixture needs at least one (task, count) entry")
        for i, entry in enumerate(tasks):
            if (len(entry) != 2 or not isinstance(entry[0], Task) or not isinstance(entry[1], int)
                    or entry[1] < 0):
                raise ValueError(f"mixture entry {i} is {entry!r}; each entry is (Task, count>=0)")
        self.tasks, self.seed, self.split = list(tasks), seed, split
        self._conversations: list[Conversation] | None = None

    def conversations(self) -> list[Conversation]:
        if self._conversations is None:
            convs = [c for task, n in self.tasks for c in task.conversations(self.split, n)]
            _rng(self.seed, "mixture", self.split).shuffle(convs)
            self._conversations = convs
        return self._conversations

    def __len__(self) -> int:
        return sum(n for _, n in self.tasks)

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.conversations())


def _mixture(weights: dict, seed: int, size: int, split: str, words) -> TaskMixture:
    if size < len(weights):
        raise ValueError(f"size={size}; a default mixture needs at least {len(weights)} "
                         "conversations")
    words = corpus_words() if words is None else words
    makers = {"spelling": lambda: SpellingTask(words, seed), "letter_count":
              lambda: LetterCountTask(words, seed), "arithmetic": lambda: ArithmeticTask(seed),
              "identity": lambda: IdentityTask(seed), "greeting": lambda: GreetingTask(seed)}
    counts = {k: int(size * w) for k, w in weights.items()}
    counts[next(iter(counts))] += size - sum(counts.values())  # rounding: first task
    return TaskMixture([(makers[k](), n) for k, n in counts.items()], seed, split)


def default_mid_mixture(seed: int = 0, size: int = 20_000, split: str = "train",
                        words: Sequence[str] | None = None) -> TaskMixture:
    """The mid-training mixture on the built-in tasks (no data arguments needed)."""
    return _mixture({"arithmetic": 0.3, "spelling": 0.25, "letter_count": 0.25, "identity": 0.1,
                     "greeting": 0.1}, seed, size, split, words)


def default_sft_mixture(seed: int = 0, size: int = 5_000, split: str = "train",
                        words: Sequence[str] | None = None) -> TaskMixture:
    """The SFT mixture: the same tasks, more weight on identity and greetings."""
    return _mixture({"arithmetic": 0.25, "spelling": 0.2, "letter_count": 0.2, "identity": 0.2,
                     "greeting": 0.15}, seed, size, split, words)
