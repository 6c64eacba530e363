"""Data formats and readers: see `rlhfkit.data.formats` for the table of formats."""

from rlhfkit.data.formats import (EditExample, PreferenceData, PreferencePair, PromptExample, RatingExample,
                                  SFTExample, detect_kind, edits_to_preferences, load_edits, load_preferences,
                                  load_prompts, load_ratings, load_sft, split_transcripts)
from rlhfkit.data.io import Record, check_jsonl_output, read_records, write_jsonl

__all__ = ["EditExample", "PreferenceData", "PreferencePair", "PromptExample", "RatingExample", "Record",
           "SFTExample", "check_jsonl_output", "detect_kind", "edits_to_preferences", "load_edits",
           "load_preferences", "load_prompts", "load_ratings", "load_sft", "read_records", "split_transcripts",
           "write_jsonl"]
