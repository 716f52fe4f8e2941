"""Chinchilla scaling laws (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
Models", arXiv:2203.15556).

Training compute is C ~= 6 * N * D FLOPs for N parameters and D tokens. The paper's
approach 3 fits the final loss as

    L(N, D) = E + A / N**alpha + B / D**beta
    E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28    (paper, eq. 10)

The fit is for the paper's data (MassiveText) and tokenizer, so its losses are a guide to
trends, not a prediction of your loss on your data. The paper's approaches 1 and 2 give
about 20 tokens per parameter at the compute-optimal point, the rule of thumb used here;
minimizing the approach-3 fit itself (`fit_optimal`) puts fewer parameters on more tokens.
"""

from __future__ import annotations

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
TOKENS_PER_PARAM = 20.0
"""Compute-optimal tokens per parameter (Hoffmann et al. 2022, approaches 1 and 2)."""
FAR_BELOW, FAR_ABOVE = 5.0, 200.0


def training_flops(n_params: float, tokens: float) -> float:
    """C ~= 6 N D: forward + backward FLOPs of training N parameters on D tokens."""
    return 6.0 * n_params * tokens


def predicted_loss(n_params: float, tokens: float) -> float:
    """Chinchilla approach-3 loss L(N, D) = E + A/N^alpha + B/D^beta (nats per token)."""
    return E + A / n_params**ALPHA + B / tokens**BETA


def compute_optimal(compute_flops: float) -> tuple[float, float]:
    """(N, D) with D = 20 N and 6 N D = C: N = sqrt(C / 120)."""
    n_params = (compute_flops / (6.0 * TOKENS_PER_PARAM)) ** 0.5
    return n_params, TOKENS_PER_PARAM * n_params


def fit_optimal(compute_flops: float) -> tuple[float, float]:
    """(N, D) minimizing L(N, D) subject to 6 N D = C (paper, eq. 4):
    N = G (C/6)^(beta/(alpha+beta)), D = (C/6) / N, G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    g = (ALPHA * A / (BETA * B)) ** (1.0 / (ALPHA + BETA))
    n_params = g * (compute_flops / 6.0) ** (BETA / (ALPHA + BETA))
    return n_params, compute_flops / 6.0 / n_params


def tokens_per_param_warning(n_params: float, tokens: float) -> str | None:
    """A sentence when D/N is far from ~20 (below 5 or above 200), else None."""
    ratio = tokens / n_params
    if ratio < FAR_BELOW:
        return (
            f"{ratio:.1f} tokens per parameter is far below the compute-optimal ~20: "
            "a smaller model trained on these tokens would likely reach a lower loss"
        )
    if ratio > FAR_ABOVE:
        return (
            f"{ratio:.0f} tokens per parameter is far above the compute-optimal ~20: "
            "not compute-optimal, which can be fine when the model will serve many tokens "
            "(a smaller model is cheaper to run)"
        )
    return None
