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


def test_transcripts_as_asr_lets_asr_batches_hear_every_tasks_words(corpus, tmp_path):
    """With data.transcripts_as_asr an ASR-only stage also trains on the other tasks' clips, their
    transcripts normalised to ASR answers; without it, ASR batches hold ASR clips only."""
    import itertools
    from types import SimpleNamespace

    from conftest import tiny_config
    from speechllm.data.synth import KWS_POOL
    from speechllm.training.datamodule import SpeechDataModule
    from speechllm.training.run import build_registry, load_examples
    from speechllm.training.stage_scheduler import StagePlan

    def asr_batches(flag: str):
        cfg = tiny_config("tiny", f"data.train_manifests=[{corpus}/train.jsonl]", f"output_dir={tmp_path}",
                          "data.num_workers=0", "data.max_batch_seconds=20", f"data.transcripts_as_asr={flag}")
        registry = build_registry([])
        examples = load_examples(cfg, registry, tmp_path, "train").examples
        data = SpeechDataModule(cfg, StagePlan(cfg), registry, examples, [])
        data.trainer = SimpleNamespace(global_rank=0, world_size=1)
        drawn = [examples[i] for batch in itertools.islice(iter(data.train_dataloader().batch_sampler), 60)
                 for i, _ in batch]
        return examples, drawn

    plain, drawn = asr_batches("false")
    assert {e.task for e in drawn} == {"asr"} and all("/asr" not in e.id for e in drawn)
    examples, drawn = asr_batches("true")
    derived = [e for e in examples if e.id.endswith("/asr")]
    by_id = {e.id: e for e in plain}
    assert len(examples) == len(plain) + len(derived)
    # Every spoken clip of another task, and no non-speech clip (it has no transcript).
    assert len(derived) == sum(e.task != "asr" and bool(e.fields.get("transcript")) for e in plain)
    assert {by_id[e.id.removesuffix("/asr")].task for e in derived} == {"kws", "kwe", "ic", "sf", "sc", "sns", "st"}
    for e in derived:
        source = by_id[e.id.removesuffix("/asr")]
        assert e.task == "asr" and e.audio == source.audio and e.fields == {}
        assert e.target == source.fields["transcript"].replace(",", "").lower()
    spotted = [e for e in derived if by_id[e.id.removesuffix("/asr")].target in KWS_POOL]
    assert all(by_id[e.id.removesuffix("/asr")].target in e.target.split() for e in spotted) and spotted
    heard = {e.id for e in drawn}
    assert heard & {e.id for e in derived} and heard & {e.id for e in plain if e.task == "asr"}
