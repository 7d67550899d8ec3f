#!/usr/bin/env Rscript
# lme4 reference for random_spec(63) of tests/core/test_fit_properties.py (q = 3 subjects nested in
# 3 sites, 4 rows missing per voxel): its likelihood has a local maximum at D_site = 0 besides lme4's
# interior one (docs/model.md, "Convergence", the second start).
#
# Run from the repository root:  Rscript tests/reference/fit_seed63.R
# Reads tests/reference/data/seed63/data.csv (the design and its 3 voxels, NA = missing row), writes
# tests/reference/data/seed63/lme4.csv: per fit (reml 1 or 0) and voxel the llh, sigma2 and site variance.
suppressMessages(library(lme4))
dir <- "tests/reference/data/seed63"
d <- read.csv(file.path(dir, "data.csv"))
d$subject <- factor(d$subject); d$site <- factor(d$site)
ctrl <- lmerControl(check.nobs.vs.nlev = "ignore", check.nobs.vs.nRE = "ignore",
                    optCtrl = list(ftol_abs = 1e-12, xtol_abs = 1e-12))
out <- NULL
for (reml in c(TRUE, FALSE)) {
  for (j in 0:2) {
    y <- d[[paste0("y", j)]]
    dd <- d[!is.na(y), ]; dd$y <- y[!is.na(y)]
    m <- lmer(y ~ 0 + x0 + x1 + x2 + (0 + zs0 + zs1 + zs2 | subject) + (0 + zt0 | site), data = dd,
              REML = reml, control = ctrl)
    vc <- as.data.frame(VarCorr(m))
    out <- rbind(out, data.frame(reml = as.integer(reml), voxel = j, llh = as.numeric(logLik(m)), sigma2 = sigma(m)^2,
                                 site_var = vc$vcov[vc$grp == "site"]))
  }
}
write.csv(out, file.path(dir, "lme4.csv"), row.names = FALSE, quote = FALSE)
