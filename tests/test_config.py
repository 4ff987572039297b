"""The `args:` block of serve_config.yaml is validated before anything starts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mlx_orchard.config import OrchardArgs
from mlx_orchard.families import FAMILIES
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
                        "dedicated": True,
                        "batching": {"max_batch_size": 64},
                        "deployment": {"max_ongoing_requests": 8},
                    }
                ]
            }
        )


def test_typos_are_refused_not_ignored():
    with pytest.raises(ValidationError):
        OrchardArgs.model_validate({"llm": [{"name": "a", "source": "x", "max_batch_sise": 4}]})

    with pytest.raises(ValidationError, match="never fill"):
        OrchardArgs.model_validate(
            {"pools": {"embeddings": {"batching": {"max_batch_size": 64}, "deployment": {"max_ongoing_requests": 8}}}}
        )


def test_pool_settings_belong_to_the_pool_unless_a_model_is_dedicated():
    with pytest.raises(ValidationError, match="dedicated: true"):
        OrchardArgs.model_validate({"llm": [{"name": "a", "source": "x", "deployment": {"num_replicas": 2}}]})
    with pytest.raises(ValidationError, match="pools.<family>.batching"):
        OrchardArgs.model_validate({"embeddings": [{"name": "a", "source": "x", "batching": {"max_batch_size": 4}}]})
    with pytest.raises(ValidationError, match="no such family"):
        OrchardArgs.model_validate({"pools": {"vision": {}}})
    with pytest.raises(ValidationError, match="pools.llm.defaults"):
        OrchardArgs.model_validate({"pools": {"llm": {"defaults": {"max_batch_sise": 4}}}})
    with pytest.raises(ValidationError, match="pinned models"):
        OrchardArgs.model_validate(
            {"pools": {"llm": {"max_num_models_per_replica": 1}}, "llm": [{"name": "a", "source": "x"}, {"name": "b", "source": "y"}]}
        )
    ok = OrchardArgs.model_validate(
        {"llm": [{"name": "a", "source": "x", "dedicated": True, "deployment": {"num_replicas": 2}}]}
    )
    assert ok.llm[0].dedicated_pool().max_num_models_per_replica == 1


@pytest.mark.parametrize(
    "change",
    [
        {"speculative": {"method": "draft_model"}},
        {"speculative": {"ngram_min": 5, "ngram_max": 3}},
        {"speculative": {"num_draft_tokens": 0}},
        {"kv_bits": 7},
        {"kv_group_size": 48},
    ],
)
def test_speculative_and_kv_cache_settings_are_checked(change):
    args = default_args()
    args["llm"][0].update(change)
    with pytest.raises(ValidationError):
        OrchardArgs.model_validate(args)


def test_speculative_and_kv_cache_settings_reach_the_model_entry():
    args = default_args()
    args["llm"][0].update({"speculative": {"method": "prompt_lookup", "num_draft_tokens": 6}, "kv_bits": 8})
    entry = OrchardArgs.model_validate(args).llm[0]
    assert entry.speculative is not None and entry.speculative.num_draft_tokens == 6
    assert entry.kv_bits == 8 and entry.kv_group_size == 64


def test_a_pool_without_a_cpu_reservation_gets_a_small_one():
    from mlx_orchard.config import DEFAULT_REPLICA_CPUS, PoolOptions

    assert PoolOptions().ray_options({}, None)["ray_actor_options"]["num_cpus"] == DEFAULT_REPLICA_CPUS < 1
    given = PoolOptions.model_validate({"deployment": {"ray_actor_options": {"num_cpus": 2}}})
    assert given.ray_options({}, None)["ray_actor_options"]["num_cpus"] == 2
    # the default app leaves room on a 2-core machine for every family it does not configure yet
    args = OrchardArgs.model_validate(default_args())
    taken = sum(args.pool(f).ray_options({}, None)["ray_actor_options"]["num_cpus"] for f in FAMILIES if args.configured(f))
    assert taken + (len(FAMILIES) - 4) * DEFAULT_REPLICA_CPUS <= 2
