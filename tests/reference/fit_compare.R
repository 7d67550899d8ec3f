#!/usr/bin/env Rscript
# Reference likelihood-ratio tests with lme4 for the datasets written by make_compare_reference.py.
#
# Run from the repository root:
#   python tests/reference/make_compare_reference.py && Rscript tests/reference/fit_compare.R
#
# For every case in tests/reference/data/compare_<case>/ and every voxel (column of Y.csv), the
# voxel's NA rows are dropped and the two models of formulas.txt are fitted with lme4::lmer
# (REML as formulas.txt says) with nloptwrap, bobyqa and Nelder_Mead (tight tolerances), then
# nloptwrap once more from the best theta; the fit with the largest logLik is kept, as in
# fit_lme4.R.  R's test is anova(small, big, refit = FALSE): Chisq = 2 * max(0, diff(logLik)),
# Df = difference in parameter counts, and its plain chi-square p-value (R knows no boundary
# mixtures; blmm's p-values are checked against the mixture computed independently).
# Results go to lme4_anova.json in the case's folder.
#
# Needs: R, lme4.  No JSON package: numbers are written with the shortest of 15/16/17
# significant digits that reads back to the identical double.

suppressPackageStartupMessages(library(lme4))

args <- commandArgs(trailingOnly = FALSE)
file_arg <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(file_arg)) dirname(normalizePath(file_arg)) else "tests/reference"
data_dir <- file.path(here, "data")

cases <- commandArgs(trailingOnly = TRUE)
if (!length(cases)) cases <- c("slope", "crossed", "fixed", "uncorrelated")

json_num <- function(x) {
  if (is.na(x) || !is.finite(x)) return("null")
  for (d in 15:17) {
    s <- sprintf(paste0("%.", d, "g"), x)
    if (as.numeric(s) == x) return(s)
  }
  s
}
json_value <- function(x) {
  if (is.null(x)) return("null")
  if (is.list(x)) {
    parts <- vapply(x, json_value, "")
    if (is.null(names(x))) return(paste0("[", paste(parts, collapse = ", "), "]"))
    keys <- paste0("\"", names(x), "\"")
    return(paste0("{", paste(paste0(keys, ": ", parts), collapse = ", "), "}"))
  }
  if (is.logical(x)) return(if (is.na(x)) "null" else if (x) "true" else "false")
  if (is.character(x)) return(paste0("\"", gsub("\"", "\\\\\"", x), "\""))
  if (length(x) != 1) return(paste0("[", paste(vapply(x, json_num, ""), collapse = ", "), "]"))
  json_num(as.numeric(x))
}

singular_cc <- .makeCC(action = "ignore", tol = 1e-4)
controls <- list(
  nloptwrap = lmerControl(
    optimizer = "nloptwrap",
    optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  ),
  bobyqa = lmerControl(
    optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  ),
  Nelder_Mead = lmerControl(
    optimizer = "Nelder_Mead",
    optCtrl = list(FtolAbs = 1e-14, FtolRel = 1e-15, XtolRel = 1e-12, maxfun = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  )
)

fit_one <- function(form, df, reml, ctrl, start = NULL) {
  tryCatch(
    suppressMessages(suppressWarnings(
      lme4::lmer(as.formula(form), data = df, REML = reml, control = ctrl, start = start)
    )),
    error = function(e) { message("  fit failed: ", conditionMessage(e)); NULL }
  )
}
llh_of <- function(fit) if (is.null(fit)) NA_real_ else as.numeric(logLik(fit))

# the best of four fits, and the logLik gap to the second best (tightness of the optimum)
fit_best <- function(form, df, reml) {
  fits <- lapply(controls, function(ctrl) fit_one(form, df, reml, ctrl))
  llhs <- vapply(fits, llh_of, 0)
  th0 <- getME(fits[[which.max(llhs)]], "theta")
  fits$nloptwrap_restart <- fit_one(form, df, reml, controls$nloptwrap, start = list(theta = th0))
  llhs <- vapply(fits, llh_of, 0)
  srt <- sort(llhs[!is.na(llhs)], decreasing = TRUE)
  list(fit = fits[[which.max(llhs)]], optimizer = names(fits)[which.max(llhs)],
       gap = srt[1] - srt[2])
}

versions <- list(R = R.version.string, lme4 = as.character(packageVersion("lme4")),
                 Matrix = as.character(packageVersion("Matrix")),
                 nloptr = as.character(packageVersion("nloptr")),
                 minqa = as.character(packageVersion("minqa")))

for (case in cases) {
  d <- file.path(data_dir, paste0("compare_", case))
  spec <- read.delim(file.path(d, "formulas.txt"), header = FALSE, col.names = c("key", "value"),
                     stringsAsFactors = FALSE)
  get <- function(key) spec$value[spec$key == key]
  reml <- as.logical(get("REML"))
  design <- read.csv(file.path(d, "design.csv"))
  Y <- as.matrix(read.csv(file.path(d, "Y.csv"), na.strings = "NA"))
  cat("case", case, if (reml) "REML" else "ML", "\n")
  voxels <- list()
  for (v in colnames(Y)) {
    keep <- !is.na(Y[, v])
    df <- design[keep, , drop = FALSE]
    df$y <- Y[keep, v]
    for (g in intersect(c("subject", "site"), names(df))) df[[g]] <- factor(df[[g]])
    small <- fit_best(get("small"), df, reml)
    big <- fit_best(get("big"), df, reml)
    a <- suppressMessages(anova(small$fit, big$fit, refit = FALSE))
    voxels[[length(voxels) + 1]] <- list(
      voxel = v, n_obs = nobs(big$fit),
      llh_small = llh_of(small$fit), llh_big = llh_of(big$fit),
      npar_small = a$npar[1], npar_big = a$npar[2],
      Chisq = a$Chisq[2], Df = a$Df[2], p_chisq = a[["Pr(>Chisq)"]][2],
      singular_small = isSingular(small$fit, tol = 1e-4), singular_big = isSingular(big$fit, tol = 1e-4),
      optimizer_small = small$optimizer, optimizer_big = big$optimizer,
      llh_gap_small = small$gap, llh_gap_big = big$gap
    )
    cat(sprintf("  %-3s n=%d llh_small=%.8f llh_big=%.8f Chisq=%.8g gaps=%.1e/%.1e\n", v, nobs(big$fit),
                llh_of(small$fit), llh_of(big$fit), a$Chisq[2], small$gap, big$gap))
  }
  out <- list(case = case, REML = reml, formula_small = get("small"), formula_big = get("big"),
              test = "anova(small, big, refit = FALSE)", versions = versions, voxels = voxels)
  entries <- vapply(names(out), function(k) paste0(" \"", k, "\": ", json_value(out[[k]])), "")
  entries[length(entries)] <- paste0(" \"voxels\": [\n",
                                     paste0("  ", vapply(voxels, json_value, ""), collapse = ",\n"), "\n ]")
  writeLines(c("{", paste(entries, collapse = ",\n"), "}"), file.path(d, "lme4_anova.json"))
}
