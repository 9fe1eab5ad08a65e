"""Depthwise 3x3 conv + BN + ReLU6 per layer: each dwsep backend and the eager / torch.compile
baselines, in inference forward, training forward and forward+backward (see conftest.py)."""


def test_depthwise(benchmark, bench_session, dw_case):
    benchmark.group = f"{dw_case.layer.name}-{dw_case.mode}-{dw_case.layout}"
    bench_session.run_layer(benchmark, dw_case)
