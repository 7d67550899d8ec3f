#!/usr/bin/env Rscript
# Reference designs for blmm.formula: R's model.matrix and lme4::lFormula(...)$reTrms.
#
# Run from the repository root:   Rscript tests/reference/fit_formula_design.R
#
# Reads data/formula/participants.csv (the committed table) and data/formula/cases.csv
# (name, formula), and for each case writes data/formula/<name>/:
#   rows.csv     1-based table rows lme4 keeps (na.omit over the formula's variables)
#   X.csv        lFormula(...)$X, header = R's column names
#   Z.csv        t(Zt) as a dense matrix (rows = kept rows, columns = Zt rows)
#   reTrms.csv   one row per Z column: term (1-based, reTrms order), group (names(cnms)),
#                level (its grouping factor's level), cnm (effect name)
#   flist.csv    the level of each kept row per grouping factor in flist (header = names(flist))
# Strings sort in the C locale (as Python's sorted / numpy do).  Numbers are written with 17
# significant digits.  Needs R and lme4 only.
suppressPackageStartupMessages(library(lme4))
invisible(Sys.setlocale("LC_COLLATE", "C"))

args <- commandArgs(trailingOnly = FALSE)
file_arg <- sub("^--file=", "", args[grep("^--file=", args)])
here <- if (length(file_arg)) dirname(normalizePath(file_arg)) else "tests/reference"
data_dir <- file.path(here, "data", "formula")

table <- read.csv(file.path(data_dir, "participants.csv"), na.strings = c("", "NA"),
                  stringsAsFactors = TRUE)
table$.y <- seq_len(nrow(table))
cases <- read.csv(file.path(data_dir, "cases.csv"), stringsAsFactors = FALSE)

write_num <- function(m, path) {
  m <- as.matrix(m)
  out <- matrix(formatC(m, digits = 17, format = "g"), nrow = nrow(m))
  out <- gsub(" ", "", out)
  colnames(out) <- colnames(m)
  write.csv(out, path, row.names = FALSE, quote = TRUE)
}

ctrl <- lmerControl(check.nobs.vs.nlev = "ignore", check.nobs.vs.nRE = "ignore",
                    check.nlev.gtr.1 = "ignore", check.rankX = "ignore",
                    check.scaleX = "ignore")
for (i in seq_len(nrow(cases))) {
  name <- cases$name[i]
  out <- file.path(data_dir, name)
  dir.create(out, showWarnings = FALSE)
  lf <- lFormula(as.formula(paste(".y", cases$formula[i])), data = table, control = ctrl)
  rows <- as.integer(rownames(lf$fr))
  write.csv(data.frame(row = rows), file.path(out, "rows.csv"), row.names = FALSE)
  write_num(lf$X, file.path(out, "X.csv"))
  re <- lf$reTrms
  Z <- t(as.matrix(re$Zt))
  colnames(Z) <- seq_len(ncol(Z))
  write_num(Z, file.path(out, "Z.csv"))
  asgn <- attr(re$flist, "assign")
  info <- NULL
  for (k in seq_along(re$cnms)) {
    q <- length(re$cnms[[k]])
    lev <- levels(re$flist[[asgn[k]]])
    info <- rbind(info, data.frame(term = k, group = names(re$cnms)[k],
                                   level = rep(lev, each = q), cnm = rep(re$cnms[[k]], length(lev))))
  }
  stopifnot(nrow(info) == ncol(Z))
  write.csv(info, file.path(out, "reTrms.csv"), row.names = FALSE)
  fl <- as.data.frame(lapply(re$flist, as.character), check.names = FALSE)
  write.csv(fl, file.path(out, "flist.csv"), row.names = FALSE)
  cat(name, ": X", dim(lf$X), " Z", dim(Z), "\n")
}
cat(R.version.string, "lme4", format(packageVersion("lme4")), "Matrix", format(packageVersion("Matrix")), "\n")
