# Per-vertex timing of R's lme4 (and lmerTest's Satterthwaite df) on the ABCD-like designs.
#
# Reads the CSV files that benchmarks/compare_alternatives.py writes (d1.csv, d2.csv: columns
# subject, X1..X23, z1, z2, y1..yV) and fits, vertex by vertex,
#
#   design 1: y ~ 0 + X1 + ... + X23 + (1 | subject)
#   design 2: y ~ 0 + X1 + ... + X23 + (0 + z1 + z2 | subject)      (z1 = 1, z2 = time)
#
# with lme4's defaults (REML, default optimiser and control), twice:
#
#   * lme4::lmer alone (estimation only);
#   * lmerTest::lmer plus contest1D() of one T contrast with Satterthwaite df (estimation plus
#     the inference blmm's timing includes).
#
# One untimed warm-up fit per design and variant comes first.  Writes one JSON object.
#
#   Rscript benchmarks/lme4_time.R DATADIR OUT.json [DESIGNS (e.g. 1,2)] [CONTRAST_COLUMN]
#
# CONTRAST_COLUMN is the X column the T contrast tests (default 4, "time").

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) stop("usage: Rscript lme4_time.R DATADIR OUT.json [DESIGNS] [CONTRAST_COLUMN]")
datadir <- args[1]
outfile <- args[2]
designs <- if (length(args) >= 3) as.integer(strsplit(args[3], ",")[[1]]) else c(1L, 2L)
contrast_col <- if (length(args) >= 4) as.integer(args[4]) else 4L

elapsed <- function(expr) {
  t0 <- proc.time()
  value <- withCallingHandlers(force(expr), warning = function(w) {
    warnings_seen <<- c(warnings_seen, conditionMessage(w))
    invokeRestart("muffleWarning")
  })
  t1 <- proc.time()
  list(value = value, seconds = t1[["elapsed"]] - t0[["elapsed"]],
       cpu = t1[["user.self"]] + t1[["sys.self"]] - t0[["user.self"]] - t0[["sys.self"]])
}

result <- list(
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  lmerTest = as.character(packageVersion("lmerTest")),
  blas = sessionInfo()$BLAS,
  designs = list()
)

for (d in designs) {
  dat <- read.csv(file.path(datadir, sprintf("d%d.csv", d)))
  dat$subject <- factor(dat$subject)
  xcols <- grep("^X[0-9]+$", names(dat), value = TRUE)
  ycols <- grep("^y[0-9]+$", names(dat), value = TRUE)
  p <- length(xcols)
  re <- if (d == 1) "(1 | subject)" else "(0 + z1 + z2 | subject)"
  f <- as.formula(paste("y ~ 0 +", paste(xcols, collapse = " + "), "+", re))
  L <- numeric(p)
  L[contrast_col] <- 1

  warnings_seen <- character(0)
  dat$y <- dat[[ycols[1]]]
  invisible(lme4::lmer(f, data = dat, REML = TRUE))  # warm-up (untimed)
  invisible(lmerTest::contest1D(lmerTest::lmer(f, data = dat, REML = TRUE), L, ddf = "Satterthwaite"))

  per_vertex <- list()
  for (k in seq_along(ycols)) {
    dat$y <- dat[[ycols[k]]]
    warnings_seen <- character(0)
    a <- elapsed(lme4::lmer(f, data = dat, REML = TRUE))
    b <- elapsed({
      fit2 <- lmerTest::lmer(f, data = dat, REML = TRUE)
      ct <- lmerTest::contest1D(fit2, L, ddf = "Satterthwaite")
      list(fit = fit2, ct = ct)
    })
    fit <- a$value
    vc <- as.data.frame(VarCorr(fit))
    per_vertex[[k]] <- list(
      column = ycols[k],
      lmer_s = a$seconds,
      lmerTest_s = b$seconds,
      lmer_cpu_s = a$cpu,
      lmerTest_cpu_s = b$cpu,
      beta = unname(fixef(fit)),
      se = unname(sqrt(diag(as.matrix(vcov(fit))))),
      llh = as.numeric(logLik(fit)),
      sigma2 = sigma(fit)^2,
      varcorr = as.list(setNames(vc$vcov, paste(vc$var1, vc$var2, sep = ":"))),
      singular = isSingular(fit),
      optimizer_evals = fit@optinfo$feval,
      contrast_estimate = b$value$ct$Estimate,
      contrast_df = b$value$ct$df,
      contrast_t = b$value$ct[["t value"]],
      warnings = unique(warnings_seen)
    )
  }
  lmer_s <- sapply(per_vertex, `[[`, "lmer_s")
  lmerTest_s <- sapply(per_vertex, `[[`, "lmerTest_s")
  result$designs[[as.character(d)]] <- list(
    design = d, n = nrow(dat), levels = nlevels(dat$subject), p = p, vertices = length(ycols),
    formula = paste(deparse(f, width.cutoff = 500L), collapse = " "),
    contrast_column = xcols[contrast_col],
    lmer_median_s = median(lmer_s), lmer_mean_s = mean(lmer_s),
    lmerTest_median_s = median(lmerTest_s), lmerTest_mean_s = mean(lmerTest_s),
    per_vertex = per_vertex
  )
  cat(sprintf("design %d: n = %d, %d subjects, %d vertices: lmer %.3f s/vertex (median), lmerTest + Satterthwaite %.3f s/vertex\n",
              d, nrow(dat), nlevels(dat$subject), length(ycols), median(lmer_s), median(lmerTest_s)))
}

writeLines(toJSON(result, auto_unbox = TRUE, digits = NA, pretty = TRUE), outfile)
