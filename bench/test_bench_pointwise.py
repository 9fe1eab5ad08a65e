"""Pointwise 1x1 conv (GEMM) + BN + ReLU6 per layer: each dwsep backend and the eager /
torch.compile baselines, in inference forward, training forward and forward+backward."""


def test_pointwise(benchmark, bench_session, pw_case):
    benchmark.group = f"{pw_case.layer.name}-{pw_case.mode}-{pw_case.layout}"
    bench_session.run_layer(benchmark, pw_case)
