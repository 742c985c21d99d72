# Recipes ship as `lit_optim.conf.recipe`: `lit-optim train recipe=<name>`.
