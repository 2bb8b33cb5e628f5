"""Data in, token batches out: reading and validating rows, tokenizing, batching.

- :mod:`alignkit.data.formats`: read files or datasets, detect the format, load examples
- :mod:`alignkit.data.adapters`: Anthropic HH, summarize-from-feedback, UltraFeedback
- :mod:`alignkit.data.validation`: the per-field checks and their one-line errors
- :mod:`alignkit.data.tokenize`: chat templates, prompt/completion ids, length policy
- :mod:`alignkit.data.batching`: length-grouped batches and padding collators
"""

from alignkit.data.adapters import split_hh_transcript
from alignkit.data.batching import (
    collate_pairs,
    collate_prompts,
    collate_sequences_for_reward,
    collate_sft,
    collate_unpaired,
    length_grouped_batches,
)
from alignkit.data.examples import (
    Completion,
    Message,
    PreferenceExample,
    Prompt,
    Row,
    SFTExample,
    UnpairedExample,
)
from alignkit.data.formats import (
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    UNPAIRED_FORMATS,
    load_preferences,
    load_sft,
    load_unpaired,
    read_rows,
)
from alignkit.data.tokenize import (
    LengthReport,
    TokenizedPair,
    TokenizedSFT,
    TokenizedUnpaired,
    encode_completion,
    encode_prompt,
    tokenize_pairs,
    tokenize_sft,
    tokenize_unpaired,
)

__all__ = [
    "PREFERENCE_FORMATS",
    "SFT_FORMATS",
    "UNPAIRED_FORMATS",
    "Completion",
    "LengthReport",
    "Message",
    "PreferenceExample",
    "Prompt",
    "Row",
    "SFTExample",
    "TokenizedPair",
    "TokenizedSFT",
    "TokenizedUnpaired",
    "UnpairedExample",
    "collate_pairs",
    "collate_prompts",
    "collate_sequences_for_reward",
    "collate_sft",
    "collate_unpaired",
    "encode_completion",
    "encode_prompt",
    "length_grouped_batches",
    "load_preferences",
    "load_sft",
    "load_unpaired",
    "read_rows",
    "split_hh_transcript",
    "tokenize_pairs",
    "tokenize_sft",
    "tokenize_unpaired",
]
