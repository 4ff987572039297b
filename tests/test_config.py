"""The `args:` block of serve_config.yaml is validated before anything starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlx_orchard.config import OrchardArgs
from tests.conftest import default_args


def test_the_default_config_validates_and_names_every_family():
    args = OrchardArgs.model_validate(default_args())
    assert [e.name for e in args.llm] == ["smollm2"]
    assert args.embeddings and args.whisper


def test_a_name_used_twice_is_refused():
    with pytest.raises(ValidationError, match="used twice"):
        OrchardArgs.model_validate(
            {"llm": [{"name": "a", "source": "x"}], "embeddings": [{"name": "b", "source": "y", "aliases": ["a"]}]}
        )


def test_a_batch_that_could_never_fill_is_refused():
    with pytest.raises(ValidationError, match="never fill"):
        OrchardArgs.model_validate(
            {
                "embeddings": [
                    {
                        "name": "e",
                        "source": "y",
                        "batching": {"max_batch_size": 64},
                        "deployment": {"max_ongoing_requests": 8},
                    }
                ]
            }
        )


def test_typos_are_refused_not_ignored():
    with pytest.raises(ValidationError):
        OrchardArgs.model_validate({"llm": [{"name": "a", "source": "x", "max_batch_sise": 4}]})
