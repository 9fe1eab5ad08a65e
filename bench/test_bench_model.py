"""MobileNetV1 throughput: dwsep's model on each backend (and its freeze() copy, for
inference) against the pure-PyTorch reference model (eager and torch.compile), for inference
and a training step (forward, cross-entropy, backward, SGD step). Skips with "MobileNetV1 not
available" while the model is missing."""


def test_model(benchmark, bench_session, model_case):
    benchmark.group = f"mobilenetv1-{model_case.mode}"
    bench_session.run_model(benchmark, model_case)
