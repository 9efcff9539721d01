"""Which textual-inversion embeddings a job's prompts use, torch-free.

A1111 uses an embedding wherever its name's token ids occur in a prompt's. CLIP's tokenizer
lowercases, cuts a text into runs of letters, single digits and runs of other characters,
and cuts each of those into tokens, the last of a run marked as its end. So a name is used
only where its characters occur, in any case, and where a name ending in a letter is not
followed by one: ``EasyNegative``, ``(easynegative:1.2)``, ``easynegative,`` and
``easynegative_v2`` use ``easynegative``; ``easynegatives`` does not. Where a name starts
inside a word (``xeasynegative``) only the tokens tell, so those count as used too.

At submit the farm lists the registered embeddings whose names the prompts hold that way
(``names_in``), so that workers fetch them; the engine then matches them on token ids as
A1111 does. The rule may list a name whose tokens do not match (a name ending in ``-``
before another ``-``, a name inside a word that the tokenizer cuts elsewhere): that costs
the fetch of a small file (an image's ``TI hashes`` name only the embeddings the engine
used); it never misses one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from farm.spec import JobSpec

_LETTER = r"[^\W\d_]"


def _pattern(name: str) -> str:
    """A name where its tokens may stand: a letter at its end is followed by none."""
    after = f"(?!{_LETTER})" if name[-1:].isalpha() else ""
    return re.escape(name) + after


def names_in(texts: Iterable[str], names: Iterable[str]) -> list[str]:
    """The ``names`` that stand as words in any of ``texts``, case-insensitively, in the
    order of ``names``."""
    wanted = sorted(set(names), key=len, reverse=True)  # the longest name first
    if not wanted:
        return []
    pattern = re.compile("|".join(_pattern(n) for n in wanted), re.IGNORECASE)
    by_folded: dict[str, list[str]] = {}
    for n in wanted:  # names that differ in case only are the same tokens
        by_folded.setdefault(n.casefold(), []).append(n)
    found: set[str] = set()
    for text in texts:
        for m in pattern.finditer(text):
            found.update(by_folded[m.group(0).casefold()])
        if len(found) == len(wanted):
            break
    return [n for n in dict.fromkeys(names) if n in found]


def prompt_texts(spec: JobSpec) -> list[str]:
    """Every text of a job that becomes a prompt or a negative prompt."""
    return [*spec.prompts, spec.negative_prompt, *spec.sweep.get("negative_prompt", [])]
