# Hydra configs shipped inside the wheel as the package `lit_optim.conf`.
