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
