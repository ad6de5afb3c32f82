"""The paper's D²AM configuration at paper scale (256×256×6 input, full width, K = 3).

Other configs start from this one and override fields; the dict is locked so that a misspelled
override fails with the field's name.
"""

import ml_collections


def get_model_config() -> ml_collections.ConfigDict:
    """The network (DESIGN.md "The model"; RFM's layer table)."""
    m = ml_collections.ConfigDict()
    m.width = 1.0                  # channel multiplier; 1.0 = the paper's network
    m.drlm_reduction = 16          # τ, the DRLM's SE reduction ratio (Eq. 4)
    m.adaptation_dim = 512         # size of the adaptation layer h (Eq. 9)
    m.bn_momentum = 0.9            # running statistics for evaluation (training uses batch stats)
    m.bn_epsilon = 1e-5
    m.fast_conv_grad = True        # GEMM-based conv backward in E (same maths; faster on CPU)
    return m


def get_meta_config() -> ml_collections.ConfigDict:
    """The meta-learning step (Eq. 8–13, Algorithm 1 lines 9–17)."""
    c = ml_collections.ConfigDict()
    c.num_domains = 3              # K: K-1 meta-train + 1 meta-test pseudo domains
    c.per_domain_batch = 8         # images per domain batch (half live, half spoof)
    c.inner_lr = 1e-3              # α, inner SGD step on θ_M
    c.outer_lr = 1e-4              # β, outer Adam on θ_E, θ_M, θ_D
    c.lambda_p = 0.1               # λ_p, domain enhancement entropy loss (Eq. 7, 12)
    c.lambda_m = 0.05              # λ_m, MMD toward the prior (Eq. 9, 11, 12)
    c.mmd_bandwidths = (0.5, 1.0, 2.0, 4.0)  # Gaussian kernel widths, in units of sqrt(dim h)
    c.second_order = True          # exact meta-gradient through the inner step
    c.grad_cosine = False          # also report cos(first-order, second-order meta-gradient)
    c.weight_decay = 0.0           # outer Adam weight decay (paper: none stated)
    return c


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = get_model_config()
    config.meta = get_meta_config()
    config.data = ml_collections.ConfigDict()
    config.data.resolution = 256   # input H = W; channels are RGB+HSV (6)
    config.lock()
    return config
