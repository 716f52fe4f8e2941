"""The practice languages FLOWROLL and DIMMATCH: small novel languages with reference
interpreters, so that "did the model learn it?" is an exact-match number.

    >>> from lmlab.data.dsl import get_language, generate_corpus, evaluate
    >>> flowroll = get_language("flowroll")
    >>> flowroll.run("[3 1 4] | rot 1 | map *2 | sort")
    '[2 6 8]'
    >>> lines = generate_corpus("dimmatch", n=1000, seed=0, difficulty=(1, 3))
    >>> evaluate("dimmatch", lines)["overall"]["exact_match"]
    1.0

Corpus lines read `PROGRAM => RESULT`; a model is prompted with `PROGRAM =>`. Splits
come from a hash of the program, so held-out programs never move. Pure Python: importing
this package does not import torch.
"""

from lmlab.data.dsl.common import (
    DIFFICULTIES,
    SPLITS,
    DSLError,
    DSLSyntaxError,
    DSLTypeError,
    Language,
    format_line,
    format_prompt,
    parse_difficulty,
    split_line,
    split_of,
)
from lmlab.data.dsl.dimmatch import DIMMATCH, DimMatch
from lmlab.data.dsl.flowroll import FLOWROLL, FlowRoll
from lmlab.data.dsl.registry import LANGUAGES, evaluate, generate_corpus, get_language

__all__ = [
    "DIFFICULTIES",
    "DIMMATCH",
    "FLOWROLL",
    "LANGUAGES",
    "SPLITS",
    "DSLError",
    "DSLSyntaxError",
    "DSLTypeError",
    "DimMatch",
    "FlowRoll",
    "Language",
    "evaluate",
    "format_line",
    "format_prompt",
    "generate_corpus",
    "get_language",
    "parse_difficulty",
    "split_line",
    "split_of",
]
