"""The paper's six cross-dataset protocols at paper scale (256×256×6 input, the full network,
K = 3, α = 1e-3, β = 1e-4, λ_p = 0.1, λ_m = 0.05), reading the TFDS datasets built from the
original releases (d2am_jax/data/DATASETS.md). The protocol is the config's argument:

  python -m d2am_jax.main --config d2am_jax/configs/protocols.py:OCI_M --workdir runs/OCI_M \
      --config.data.data_dir=/data/tfds
  (likewise OCM_I, OMI_C, ICM_O — Table 1 — and MI_C, MI_O — Table 2, limited source data)

Build first, e.g. `python -m d2am_jax.data.build oulu_npu --manual_dir /data/OULU-NPU
--data_dir /data/tfds` for each dataset named in the protocol. Splits follow SSDG's code
(data.splits='ssdg'; 'strict' scores only the target's test part). The paper does not state the
number of epochs or the per-domain batch size. The per-domain batch is RFM's, the code D²AM builds
on (rshaojimmy/RFMetaFAS main.py: batchsize=10 for each domain's live loader and its spoof loader,
so 10 live + 10 spoof = 20 per domain batch); no measurement here argues for another value. 30
epochs of one pass over the source are this project's choice. Expected run time: dominated by the
meta-step: with 8 images per domain batch it took about 5–10 s per step at this scale on a
2-core CPU, and 20 images scale that by about 2.5 (impractical there: use a GPU/TPU).
"""

from d2am_jax.configs import default
from d2am_jax.data.protocols import PAPER_PROTOCOLS


def get_config(protocol: str = "OCI_M"):
    if protocol not in PAPER_PROTOCOLS:
        raise ValueError(f"configs/protocols.py: unknown protocol {protocol!r}; expected one of "
                         f"{PAPER_PROTOCOLS} (as --config d2am_jax/configs/protocols.py:OCI_M)")
    config = default.get_config()
    config.data.name = "protocol"
    config.data.protocol = protocol
    config.data.resolution = 256
    config.model.width = 1.0
    config.meta.num_domains = 3
    config.meta.per_domain_batch = 20  # RFM's 10 live + 10 spoof per domain
    config.num_epochs = 30
    return config
