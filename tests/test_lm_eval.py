"""lm-evaluation-harness 0.4 on the in-memory model, offline (a task YAML over local JSON written here)."""

import pytest
import torch
from lm_tiny import STORY_ITEMS, convert_stories, write_story_task

from fqbench.eval.lm_eval import evaluate_tasks, flatten_results
from fqbench.models.hf import load_causal_lm


@pytest.fixture(scope="module")
def stories(data_root, tmp_path_factory):
    torch.set_num_threads(1)
    return load_causal_lm(str(convert_stories(data_root, tmp_path_factory.mktemp("stories") / "hf")))


def own_loglikelihood(model, tokenizer, context, continuation):
    """Sum of log p(continuation tokens | context), tokenizing context+continuation once."""
    context_ids = tokenizer(context).input_ids
    ids = torch.tensor([tokenizer(context + continuation).input_ids])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    return sum(logprobs[i - 1, ids[0, i]].item() for i in range(len(context_ids), ids.shape[1]))


def test_local_task_scores_the_in_memory_model(stories, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tokenizer, _ = stories
    folder = write_story_task(tmp_path / "tasks")
    scores = evaluate_tasks(model, tokenizer, ["stories_choice"], include_path=str(folder), batch_size=4)
    assert scores["stories_choice_acc"] >= 0.85  # a TinyStories model knows how stories go

    # lm-eval's log-likelihoods are the model's own (transformers 5 + lm-eval 0.4 agree)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    pairs = [(c, " " + choice) for c, choices, _ in STORY_ITEMS[:3] for choice in choices]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (loglik, _) in zip(pairs, got):
        assert loglik == pytest.approx(own_loglikelihood(model, tokenizer, context, continuation), abs=1e-3)

    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\]"):
        evaluate_tasks(model, tokenizer, ["no_such_task"], include_path=str(folder))


def test_results_are_flattened_to_metric_names():
    results = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01, "acc_norm,none": 0.6,
                            "acc_norm_stderr,none": "N/A", "sample_len": 10},
               "gsm8k": {"exact_match,strict-match": 0.25}}
    assert flatten_results(results) == {"arc_easy_acc": 0.5, "arc_easy_acc_stderr": 0.01, "arc_easy_acc_norm": 0.6,
                                        "gsm8k_exact_match_strict-match": 0.25}
