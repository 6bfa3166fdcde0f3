from speechllm.data.manifest import Example
from speechllm.training.datamodule import validation_examples


def example(task: str, n: int) -> Example:
    return Example(f"{task}{n}", f"/a/{task}{n}.wav", task, "t", None, 1.0, {}, f"m.jsonl:{n}")


def test_validation_takes_the_run_tasks_in_turn_up_to_the_limit():
    rows = [example("asr", n) for n in range(5)] + [example("kws", n) for n in range(3)] + [example("ic", 0)]
    picked = validation_examples(rows, {"asr", "kws"}, limit=5)
    assert [e.id for e in picked] == ["asr0", "kws0", "asr1", "kws1", "asr2"]
    assert len(validation_examples(rows, {"asr", "kws", "ic"}, limit=None)) == 9
    assert validation_examples(rows, {"st"}, limit=4) == []


def test_training_instructions_never_use_heldout_templates_and_vary_by_epoch(corpus):
    from speechllm.data.dataset import SpeechDataset
    from speechllm.data.manifest import validate_manifests
    from speechllm.data.tasks import default_registry

    registry = default_registry()
    examples = validate_manifests([str(corpus / "train.jsonl")], registry, sample_rate=16000, max_duration=30).examples
    train = SpeechDataset(examples, registry, 16000, seed=0)
    heldout = SpeechDataset(examples, registry, 16000, seed=0, heldout_instructions=True)
    changed = 0
    for index, example in enumerate(examples):
        task = registry.get(example.task)
        unseen = {task.render(t, example.fields) for t in task.heldout_templates}
        seen = {task.render(t, example.fields) for t in task.train_templates}
        drawn = [train.instruction(index, epoch) for epoch in range(4)]
        assert set(drawn) <= seen and not set(drawn) & unseen, example.id
        assert heldout.instruction(index, 0) in unseen
        assert train[(index, 0)].instruction == drawn[0]  # what the batches carry
        changed += len(set(drawn)) > 1
    assert changed > len(examples) // 2  # the phrasing changes across epochs


def test_token_budget_bounds_llm_positions_per_batch(corpus):
    import itertools
    from types import SimpleNamespace

    from conftest import tiny_config
    from speechllm.data.manifest import validate_manifests
    from speechllm.data.tasks import default_registry
    from speechllm.model.llm import build_tokenizer
    from speechllm.training.datamodule import SpeechDataModule
    from speechllm.training.stage_scheduler import StagePlan

    cfg = tiny_config("tiny", "data.max_batch_tokens=400", "data.max_batch_seconds=1000", "data.num_workers=0",
                      "phases.0.tasks={asr: 1.0, st: 1.0}")
    registry = default_registry()
    examples = validate_manifests([str(corpus / "train.jsonl")], registry, sample_rate=16000, max_duration=30).examples
    tokenizer = build_tokenizer(cfg.model.llm)
    data = SpeechDataModule(cfg, StagePlan(cfg), registry, examples, [], tokenizer=tokenizer)
    data.trainer = SimpleNamespace(global_rank=0, world_size=1)
    counts = data.token_counts
    for i, e in enumerate(examples):  # 12.5 audio embeddings per second (4x below 50 Hz), ByT5: a token per byte
        assert counts[i] > e.duration * 12.5 + len(e.target.encode())
    batches = list(itertools.islice(iter(data.train_dataloader().batch_sampler), 40))
    sizes = [sum(counts[i] for i, _ in batch) for batch in batches]
    assert all(size <= 400 for size, batch in zip(sizes, batches) if len(batch) > 1)
    assert max(len(batch) for batch in batches) > 1  # the budget is filled, not met by single examples
