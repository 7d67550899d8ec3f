#!/usr/bin/env Rscript
# lme4 / lmerTest reference for the `units_icv` case (covariates in their own units, raw Y; issue 17).
#
# Run from the repository root:
#   python -m tests.reference.make_units_reference && Rscript tests/reference/fit_units.R
#
# lme4 is unreliable on raw units (ICV in mm^3 beside standardised covariates, Y ~ 7e3), so each
# voxel is fitted on standardised data and mapped back exactly:
#   X = Xs A   (Xs: every non-intercept column centred and scaled; A upper triangular, A[1,1] = 1)
#   y = m + s ys
#   beta = A^-1 (s beta_s + m e1),  sigma2 = s^2 sigma2_s,  D (relative to sigma2) and theta unchanged,
#   vcov = s^2 A^-1 vcov_s A^-T,
#   llh  = llh_s - N log s - [REML] log|det A|,  N = n - p (REML) or n (ML).
# Contrasts L on the raw beta with no intercept weight are L A^-1 on the standardised fit (whose
# intercept weight is then 0 too): t, F, their Satterthwaite df and p are those of the standardised
# fit; estimate and se scale by s.  The mapped point is then checked with lme4's own deviance
# function built on the RAW data (devFunOnly): its llh at theta is written beside the mapped one
# (llh_devfun) and must agree to lme4's precision on those units.
# Output: tests/reference/data/units_icv/lme4_units_REML.json and lme4_units_ML.json.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})

args <- commandArgs(trailingOnly = FALSE)
file_arg <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(file_arg)) dirname(normalizePath(file_arg)) else "tests/reference"
d <- file.path(here, "data", "units_icv")

num <- function(x) {
  vapply(as.numeric(x), function(v) {
    if (!is.finite(v)) return("null")
    for (k in 15:17) {
      s <- sprintf(paste0("%.", k, "g"), v)
      if (as.numeric(s) == v) return(s)
    }
    s
  }, "")
}
arr <- function(x) paste0("[", paste(num(x), collapse = ", "), "]")
mat <- function(m) paste0("[", paste(apply(m, 1, arr), collapse = ", "), "]")

X <- as.matrix(read.csv(file.path(d, "X.csv")))
Z <- as.matrix(read.csv(file.path(d, "Z_f1.csv")))
f1 <- read.csv(file.path(d, "factors.csv"))$f1
Y <- as.matrix(read.csv(file.path(d, "Y.csv")))
n <- nrow(X)
p <- ncol(X)
# contrasts.json of this case (make_units_reference.py): T rows and one F matrix, no intercept weight
L_t <- rbind(icv = c(0, 0, 0, 0, 1), time = c(0, 0, 0, 1, 0), "age-sex" = c(0, 1, -1, 0, 0))
L_f <- rbind(c(0, 1, 0, 0, 0), c(0, 0, 0, 1, 0), c(0, 0, 0, 0, 1))

centre <- c(0, colMeans(X[, -1]))
scale <- c(1, apply(X[, -1], 2, sd))
A <- diag(scale)
A[1, ] <- centre
A[1, 1] <- 1
Xs <- X %*% solve(A)  # = (X - centre) / scale column by column, intercept kept
A_inv <- solve(A)
log_det_A <- sum(log(scale))

form <- y ~ 0 + X1 + X2 + X3 + X4 + X5 + (0 + z1 + z2 | f1)
frame <- function(Xm, y) {
  df <- data.frame(y = y, f1 = factor(f1), z1 = Z[, 1], z2 = Z[, 2])
  for (j in seq_len(p)) df[[paste0("X", j)]] <- Xm[, j]
  df
}
controls <- list(
  nloptwrap = lmerControl(optimizer = "nloptwrap", calc.derivs = FALSE,
                          optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, xtol_rel = 0, ftol_rel = 0,
                                         maxeval = 1e5)),
  bobyqa = lmerControl(optimizer = "bobyqa", calc.derivs = FALSE, optCtrl = list(rhoend = 1e-12, maxfun = 1e5))
)

for (reml in c(TRUE, FALSE)) {
  out <- character(0)
  for (v in seq_len(ncol(Y))) {
    y <- Y[, v]
    m <- mean(y)
    s <- sd(y)
    dfs <- frame(Xs, (y - m) / s)
    fits <- lapply(controls, function(ctrl) suppressMessages(suppressWarnings(
      lmerTest::lmer(form, data = dfs, REML = reml, control = ctrl))))
    llhs <- vapply(fits, function(f) as.numeric(logLik(f)), 0)
    fit <- fits[[which.max(llhs)]]
    theta <- getME(fit, "theta")
    N <- if (reml) n - p else n
    llh <- max(llhs) - N * log(s) - if (reml) log_det_A else 0
    beta_s <- fixef(fit) * s
    beta_s[1] <- beta_s[1] + m
    beta <- as.numeric(A_inv %*% beta_s)
    vcov_raw <- s^2 * A_inv %*% as.matrix(vcov(fit)) %*% t(A_inv)
    sigma2 <- s^2 * sigma(fit)^2
    Lam <- matrix(0, 2, 2)
    Lam[lower.tri(Lam, diag = TRUE)] <- theta
    D <- Lam %*% t(Lam)
    # lme4's own deviance on the raw data at the mapped point (theta is unit-free here: Z is unchanged)
    devfun <- suppressMessages(suppressWarnings(
      lmer(form, data = frame(X, y), REML = reml, devFunOnly = TRUE)))
    llh_devfun <- -devfun(theta) / 2
    tres <- lapply(rownames(L_t), function(nm) {
      r <- contest1D(fit, as.numeric(L_t[nm, ] %*% A_inv), ddf = "Satterthwaite")
      sprintf('{"name": "%s", "estimate": %s, "se": %s, "t": %s, "df": %s, "p": %s}', nm,
              num(r[["Estimate"]] * s), num(r[["Std. Error"]] * s), num(r[["t value"]]), num(r[["df"]]),
              num(r[["Pr(>|t|)"]]))
    })
    fr <- contest(fit, L_f %*% A_inv, ddf = "Satterthwaite", joint = TRUE)
    out <- c(out, sprintf(paste0(
      '{"voxel": "v%d", "llh": %s, "llh_devfun": %s, "llh_standardised": %s, "beta": %s, "sigma2": %s, ',
      '"D": %s, "theta": %s, "vcov": %s, "singular": %s, "T": [%s], ',
      '"F": {"F": %s, "NumDF": %s, "DenDF": %s, "p": %s}}'),
      v, num(llh), num(llh_devfun), num(max(llhs)), arr(beta), num(sigma2), mat(D), arr(theta),
      mat(vcov_raw), if (isSingular(fit, tol = 1e-4)) "true" else "false", paste(tres, collapse = ", "),
      num(fr[["F value"]]), num(fr[["NumDF"]]), num(fr[["DenDF"]]), num(fr[["Pr(>F)"]])))
    message(sprintf("v%d %s: llh %.10f, lme4's deviance on raw data gives %.10f (diff %.2e)", v,
                    if (reml) "REML" else "ML", llh, llh_devfun, llh_devfun - llh))
  }
  versions <- sprintf('{"R": "%s", "lme4": "%s", "lmerTest": "%s"}', R.version.string,
                      packageVersion("lme4"), packageVersion("lmerTest"))
  writeLines(paste0('{"versions": ', versions, ', "reml": ', if (reml) "true" else "false",
                    ', "log_det_A": ', num(log_det_A), ', "voxels": [\n', paste(out, collapse = ",\n"), "\n]}"),
             file.path(d, if (reml) "lme4_units_REML.json" else "lme4_units_ML.json"))
}
