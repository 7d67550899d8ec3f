#!/usr/bin/env Rscript
# Reference fits with lme4 / lmerTest for the datasets written by make_reference_data.py.
#
# Run from the repository root:
#   python tests/reference/make_reference_data.py && Rscript tests/reference/fit_lme4.R
#
# For every case in tests/reference/data/<case>/ and every voxel (column of Y.csv), the voxel's
# NA rows are dropped and the model
#   y ~ 0 + X1 + ... + Xp + (0 + f1_z1 + ... + f1_zq | f1) + (0 + f2_z1 + ... | f2) + ...
# is fitted with lmerTest::lmer, REML = TRUE and REML = FALSE, with nloptwrap, bobyqa and
# Nelder_Mead (all with tight tolerances), then once more with nloptwrap started from the best
# theta of those three.  The fit with the largest log-likelihood is kept; all four
# log-likelihoods are recorded (llh_by_optimizer), and the largest |theta| difference between
# the kept fit and the second best (theta_diff_second_best), as evidence that the optimum is
# tight (a single optimiser can stall at theta = 0 of a q = 2 block or of a small variance).  Results go to tests/reference/data/<case>/lme4_REML.json and lme4_ML.json.
#
# Needs: R, lme4, lmerTest (Debian: r-base-core r-cran-lme4 r-cran-lmertest).  No JSON package
# is needed: numbers are written by the small writer below with the shortest of 15/16/17
# significant digits that reads back to the identical double.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
})

args <- commandArgs(trailingOnly = FALSE)
file_arg <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(file_arg)) dirname(normalizePath(file_arg)) else "tests/reference"
data_dir <- file.path(here, "data")

cases <- commandArgs(trailingOnly = TRUE)
if (!length(cases)) {
  cases <- c("intercept", "slope", "crossed", "nested", "singletons", "boundary", "missing",
             "balanced_q2", "balanced_visits", "balanced_q3", "nested3", "crossed_slope",
             "two_factor_missing", "family_intercept", "family_slope", "intercept_missing",
             "family_missing", "family_slope_missing", "family_scanner_missing")
}

# ------------------------------------------------------------------------------------------
# minimal JSON writer with full double precision
#   named list -> object, unnamed list -> array, matrix -> array of rows,
#   atomic of length 1 -> scalar unless wrapped in I(), otherwise array.  NA/NaN/Inf -> null.
# ------------------------------------------------------------------------------------------
json_num <- function(x) {
  if (is.na(x) || !is.finite(x)) return("null")
  for (d in 15:17) {
    s <- sprintf(paste0("%.", d, "g"), x)
    if (as.numeric(s) == x) return(s)
  }
  s
}
json_atom <- function(x) {
  if (is.logical(x)) return(if (is.na(x)) "null" else if (x) "true" else "false")
  if (is.numeric(x)) return(json_num(as.numeric(x)))
  if (is.na(x)) return("null")
  s <- gsub("\\\\", "\\\\\\\\", as.character(x))
  s <- gsub("\"", "\\\\\"", s)
  paste0("\"", s, "\"")
}
to_json <- function(x, indent = 0) {
  pad <- strrep(" ", indent + 1)
  endpad <- strrep(" ", indent)
  if (is.null(x)) return("null")
  if (is.list(x)) {
    if (!length(x)) return(if (is.null(names(x))) "[]" else "{}")
    parts <- vapply(x, to_json, "", indent = indent + 1)
    if (!is.null(names(x))) {
      parts <- paste0(vapply(names(x), json_atom, ""), ": ", parts)
      return(paste0("{\n", paste0(pad, parts, collapse = ",\n"), "\n", endpad, "}"))
    }
    return(paste0("[\n", paste0(pad, parts, collapse = ",\n"), "\n", endpad, "]"))
  }
  if (is.matrix(x)) {
    rows <- vapply(seq_len(nrow(x)), function(i) {
      paste0("[", paste(vapply(x[i, ], json_atom, ""), collapse = ", "), "]")
    }, "")
    return(paste0("[", paste(rows, collapse = ", "), "]"))
  }
  if (length(x) == 1 && !inherits(x, "AsIs")) return(json_atom(x))
  paste0("[", paste(vapply(unclass(x), json_atom, ""), collapse = ", "), "]")
}

# ------------------------------------------------------------------------------------------
# fitting
# ------------------------------------------------------------------------------------------
singular_cc <- .makeCC(action = "ignore", tol = 1e-4)
controls <- list(
  nloptwrap = lmerControl(
    optimizer = "nloptwrap",
    optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, xtol_rel = 0, ftol_rel = 0, maxeval = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  ),
  bobyqa = lmerControl(
    optimizer = "bobyqa",
    optCtrl = list(rhoend = 1e-12, maxfun = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  ),
  Nelder_Mead = lmerControl(
    optimizer = "Nelder_Mead",
    optCtrl = list(FtolAbs = 1e-14, FtolRel = 1e-15, XtolRel = 1e-12, maxfun = 1e5),
    calc.derivs = FALSE, check.conv.singular = singular_cc
  )
)
control_text <- paste(
  "each voxel fitted four times: nloptwrap(NLOPT_LN_BOBYQA; xtol_abs=1e-12, ftol_abs=1e-14,",
  "maxeval=1e5), bobyqa(rhoend=1e-12, maxfun=1e5), Nelder_Mead(FtolAbs=1e-14, FtolRel=1e-15,",
  "XtolRel=1e-12, maxfun=1e5), and nloptwrap_restart (nloptwrap started at the best theta of",
  "the first three), all with calc.derivs=FALSE; the fit with the largest logLik is kept"
)

versions <- list(
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  lmerTest = as.character(packageVersion("lmerTest")),
  Matrix = as.character(packageVersion("Matrix")),
  nloptr = as.character(packageVersion("nloptr")),
  minqa = as.character(packageVersion("minqa"))
)

read_case <- function(case) {
  d <- file.path(data_dir, case)
  X <- as.matrix(read.csv(file.path(d, "X.csv")))
  fac <- read.csv(file.path(d, "factors.csv"))
  Z <- lapply(names(fac), function(f) as.matrix(read.csv(file.path(d, paste0("Z_", f, ".csv")))))
  names(Z) <- names(fac)
  Y <- as.matrix(read.csv(file.path(d, "Y.csv"), na.strings = "NA"))
  con <- parse_contrasts(file.path(d, "contrasts.json"))
  list(X = X, factors = fac, Z = Z, Y = Y, contrasts = con)
}

# contrasts.json is written by make_reference_data.py: a list of {"name": str, "vector": list}.
# Parsed without a JSON package: each "vector" is a flat or a nested list of numbers.
parse_contrasts <- function(path) {
  txt <- paste(readLines(path), collapse = "")
  txt <- gsub("\\s", "", txt)
  items <- regmatches(txt, gregexpr("\\{[^{}]*\\}", txt))[[1]]
  lapply(items, function(it) {
    nm <- sub('.*"name":"([^"]*)".*', "\\1", it)
    vec <- sub('.*"vector":(\\[.*\\]).*', "\\1", it)
    rows <- regmatches(vec, gregexpr("\\[[^][]*\\]", vec))[[1]]
    nested <- grepl("^\\[\\[", vec)
    mats <- lapply(rows, function(r) as.numeric(strsplit(gsub("[][]", "", r), ",")[[1]]))
    L <- do.call(rbind, mats)
    list(name = nm, L = L, is_t = !nested)
  })
}

build_formula <- function(p, Z) {
  fixed <- paste0("y ~ 0 + ", paste0("X", seq_len(p), collapse = " + "))
  rand <- vapply(names(Z), function(f) {
    zn <- paste0(f, "_z", seq_len(ncol(Z[[f]])))
    paste0("(0 + ", paste(zn, collapse = " + "), " | ", f, ")")
  }, "")
  paste(fixed, paste(rand, collapse = " + "), sep = " + ")
}

build_frame <- function(cs, v) {
  y <- cs$Y[, v]
  keep <- !is.na(y)
  df <- data.frame(y = y[keep])
  for (j in seq_len(ncol(cs$X))) df[[paste0("X", j)]] <- cs$X[keep, j]
  for (f in names(cs$factors)) {
    df[[f]] <- factor(cs$factors[[f]][keep])  # only levels present in this voxel
    for (j in seq_len(ncol(cs$Z[[f]]))) df[[paste0(f, "_z", j)]] <- cs$Z[[f]][keep, j]
  }
  df
}

fit_one <- function(form, df, reml, ctrl, start = NULL) {
  tryCatch(
    suppressMessages(suppressWarnings(
      lmerTest::lmer(as.formula(form), data = df, REML = reml, control = ctrl, start = start)
    )),
    error = function(e) { message("  fit failed: ", conditionMessage(e)); NULL }
  )
}

llh_of <- function(fit) if (is.null(fit)) NA_real_ else as.numeric(logLik(fit))

# theta per factor: lme4 orders the random-effects terms by decreasing number of levels, so
# split getME(fit, "theta") by the terms' own names (cnms), not by position in the formula.
theta_by_factor <- function(fit) {
  th <- getME(fit, "theta")
  cn <- fit@cnms
  out <- list()
  pos <- 0
  for (i in seq_along(cn)) {
    q <- length(cn[[i]])
    m <- q * (q + 1) / 2
    out[[names(cn)[i]]] <- I(unname(th[pos + seq_len(m)]))
    pos <- pos + m
  }
  out
}

voxel_result <- function(v_name, fit, which_opt, llhs, factor_names, contrasts) {
  s2 <- sigma(fit)^2
  vc <- VarCorr(fit)
  s2D <- list()
  D <- list()
  for (f in factor_names) {
    m <- unname(as.matrix(vc[[f]]))
    attr(m, "stddev") <- NULL
    attr(m, "correlation") <- NULL
    m <- matrix(as.numeric(m), nrow(m))
    s2D[[f]] <- m
    D[[f]] <- m / s2
  }
  nl <- ngrps(fit)
  n_levels <- lapply(factor_names, function(f) unname(nl[[f]]))
  names(n_levels) <- factor_names
  Tres <- list()
  Fres <- list()
  is_lt <- inherits(fit, "lmerModLmerTest")
  for (cn in contrasts) {
    if (cn$is_t) {
      r <- if (is_lt) tryCatch(contest1D(fit, as.numeric(cn$L), ddf = "Satterthwaite"),
                               error = function(e) NULL) else NULL
      Tres[[length(Tres) + 1]] <- if (is.null(r)) {
        list(name = cn$name, estimate = NA, se = NA, t = NA, df = NA, p = NA)
      } else {
        list(name = cn$name, estimate = r[["Estimate"]], se = r[["Std. Error"]],
             t = r[["t value"]], df = r[["df"]], p = r[["Pr(>|t|)"]])
      }
    } else {
      r <- if (is_lt) tryCatch(contest(fit, cn$L, ddf = "Satterthwaite", joint = TRUE),
                               error = function(e) NULL) else NULL
      Fres[[length(Fres) + 1]] <- if (is.null(r)) {
        list(name = cn$name, F = NA, NumDF = NA, DenDF = NA, p = NA)
      } else {
        list(name = cn$name, F = r[["F value"]], NumDF = r[["NumDF"]], DenDF = r[["DenDF"]],
             p = r[["Pr(>F)"]])
      }
    }
  }
  vvp <- if (is_lt) unname(as.matrix(fit@vcov_varpar)) else NULL
  list(
    voxel = v_name,
    n_obs = nobs(fit),
    n_levels = n_levels,
    beta = I(unname(fixef(fit))),
    sigma2 = s2,
    sigma2D = s2D,
    D = D,
    llh = as.numeric(logLik(fit)),
    vcov = unname(as.matrix(vcov(fit))),
    singular = isSingular(fit, tol = 1e-4),
    theta = theta_by_factor(fit),
    theta_lme4 = I(unname(getME(fit, "theta"))),
    theta_lme4_names = I(names(getME(fit, "theta"))),
    optimizer = which_opt,
    llh_by_optimizer = as.list(llhs),
    lmerTest_ok = is_lt,
    vcov_varpar = vvp,
    T = Tres,
    F = Fres
  )
}

max_gap2 <- 0  # best vs second-best optimiser
max_gapw <- 0  # best vs worst optimiser
max_nb <- 0    # |nloptwrap - bobyqa| where both reached the same optimum
max_dtheta <- 0  # max |theta(best) - theta(second best)| where their logLik agree to 1e-9
n_short <- 0   # fits where some optimiser fell > 1e-6 short of the best
for (case in cases) {
  cat("case", case, "\n")
  cs <- read_case(case)
  p <- ncol(cs$X)
  form <- build_formula(p, cs$Z)
  factor_names <- names(cs$factors)
  for (reml in c(TRUE, FALSE)) {
    method <- if (reml) "REML" else "ML"
    vox <- list()
    for (v in colnames(cs$Y)) {
      df <- build_frame(cs, v)
      fits <- lapply(controls, function(ctrl) fit_one(form, df, reml, ctrl))
      llhs <- vapply(fits, llh_of, 0)
      # restart nloptwrap from the best of the three (an optimiser can stall on a boundary)
      th0 <- getME(fits[[which.max(llhs)]], "theta")
      fits$nloptwrap_restart <- fit_one(form, df, reml, controls$nloptwrap, start = list(theta = th0))
      llhs <- vapply(fits, llh_of, 0)
      if (all(is.na(llhs))) stop("all optimisers failed: ", case, " ", v)
      best <- which.max(llhs)
      fit <- fits[[best]]
      # spread between the best and the second best optimiser (tightness of the optimum),
      # and how far the worst one fell short (an optimiser stuck elsewhere)
      srt <- sort(llhs[!is.na(llhs)], decreasing = TRUE)
      gap2 <- if (length(srt) > 1) srt[1] - srt[2] else NA
      gapw <- srt[1] - srt[length(srt)]
      if (!is.na(gap2)) max_gap2 <- max(max_gap2, gap2)
      max_gapw <- max(max_gapw, gapw)
      if (!is.na(gapw) && gapw > 1e-6) n_short <- n_short + 1
      if (abs(llhs[["nloptwrap"]] - llhs[["bobyqa"]]) < 1e-6) {
        max_nb <- max(max_nb, abs(llhs[["nloptwrap"]] - llhs[["bobyqa"]]))
      }
      # theta of the second-best optimiser vs the kept one
      second <- order(llhs, decreasing = TRUE, na.last = TRUE)[2]
      dtheta <- if (is.null(fits[[second]])) NA else
        max(abs(getME(fits[[second]], "theta") - getME(fit, "theta")))
      if (!is.na(gap2) && gap2 < 1e-9) max_dtheta <- max(max_dtheta, dtheta)
      r <- voxel_result(v, fit, names(fits)[best], llhs, factor_names, cs$contrasts)
      r$theta_diff_second_best <- dtheta
      worst <- names(llhs)[which.min(llhs)]
      cat(sprintf("  %-4s %-3s n=%d llh=%.10f best=%-11s gap2=%.1e gapw=%.1e (%s) singular=%s\n",
                  method, v, r$n_obs, r$llh, names(fits)[best], gap2, gapw, worst, r$singular))
      vox[[length(vox) + 1]] <- r
    }
    q <- lapply(cs$Z, ncol)
    out <- list(
      case = case,
      method = method,
      formula = form,
      versions = versions,
      control = control_text,
      factors = I(factor_names),
      q = q,
      contrasts = lapply(cs$contrasts, function(cn) {
        list(name = cn$name, type = if (cn$is_t) "T" else "F", L = cn$L)
      }),
      voxels = vox
    )
    writeLines(to_json(out), file.path(data_dir, case, paste0("lme4_", method, ".json")))
  }
}
cat(sprintf("max logLik gap best vs second-best optimiser: %.3e\n", max_gap2))
cat(sprintf("max |theta(best) - theta(second best)| where logLik within 1e-9: %.3e\n", max_dtheta))
cat(sprintf("max |logLik(nloptwrap) - logLik(bobyqa)| where within 1e-6: %.3e\n", max_nb))
cat(sprintf("max logLik gap best vs worst optimiser: %.3e (%d fits with a gap > 1e-6)\n",
            max_gapw, n_short))
