"""The ground floor: helpers every layer uses (configs, artifacts and manifests, models, chat rendering, packing,
input readers, the stage contract, the process group). No training code."""
