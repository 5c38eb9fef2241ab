"""The job table the numba kernels run, and the block shapes their workers take.

A *job table* has one int64 row per part (see the ``J_*`` column indices). Part ``p`` is a
strided 2-D source ``S[c, r]`` (``c < rows``, ``r < cols``) written transposed into a
destination whose row ``r`` starts at ``dst + r * dst_row_stride`` and holds ``S[0..rows, r]``
as consecutive elements. ``numba_kernels.run_tiles`` runs the tile grid of every part of every group in
one ``prange``, so small parts never serialize and a whole checkpoint is one parallel region.
When ``S[0..rows, r]`` is itself contiguous (a Fortran-ordered part, or the rows of an
``out_in`` layout) the job is tiled in destination rows instead and each row is one memcpy.

Plain Python (no numba): the engine builds tables from these definitions; the kernels read the
columns as constants of their compiled code (numba's cache is keyed on ``numba_kernels.py``
alone, so a change here or in ``intrinsics.py`` needs a fresh cache: ``CONTRIBUTING.md``).
"""

from __future__ import annotations

from typing import NamedTuple

# Job table columns.
J_SRC, J_SRC_ROW, J_SRC_COL, J_ROWS, J_COLS, J_DST, J_DST_ROW, J_TILING, J_MODE, J_TILE_END = range(10)
JOB_COLUMNS = 10
# How a job is cut into tiles: bands of line blocks (a transpose), or destination rows (copies).
TILING_BLOCKS, TILING_ROWS = 0, 1
ROWS_PER_TILE = 64

# Conversion modes: the destination element from the source element's bits.
MODE_COPY, MODE_F16_TO_F32, MODE_BF16_TO_F32 = 0, 1, 2


# Tile shape in elements: ``Shape.tile_rows`` source rows (output columns) by TILE_COLS source
# columns (output rows). Whole source rows per band keep B long sequential read streams; bands
# of 64 rows give enough tiles to balance threads (20 per 1280-row part).
TILE_COLS = 8192


class Shape(NamedTuple):
    """The parameters of the one code path: ``vector``, bytes of each source row a block loads
    (``intrinsics.VECTORS``); ``tile_rows``, source rows per tile (whole blocks for every width);
    ``columns_first``, the order a tile's blocks are walked: band by band (each band left to
    right: ``B`` sequential read streams), or block column by block column (each column top to
    bottom: every destination row of the column gets ``tile_rows`` elements, whole consecutive
    lines, back to back; the copy worker walks sources whose rows are a multiple of
    :data:`ALIASING_STRIDE` apart band by band whatever the shape); ``prefetch``, how many block
    columns ahead each source row of the blocks being walked is prefetched by the copy worker
    (0: none; a column-first walk reads ``tile_rows`` rows a vector at a time, a pattern the
    hardware prefetchers do not follow). Every shape writes the same bits; which is fastest
    depends on the CPU and the element width (``block_shape``)."""

    vector: int = 32
    tile_rows: int = 64
    columns_first: bool = False
    prefetch: int = 0

    def name(self) -> str:
        order = "-c" if self.columns_first else ""
        ahead = f"-p{self.prefetch}" if self.prefetch else ""
        return f"v{self.vector}-t{self.tile_rows}{order}{ahead}"


# A column-first walk reads ``tile_rows`` rows at once; rows a multiple of this many bytes apart
# share cache sets, and there it lost to the band walk (f16 parts 2048 and 4096 wide: 10-39%
# slower on the EPYC of docs/design.md), so those sources are walked band by band.
ALIASING_STRIDE = 4096

DEFAULT_SHAPE = Shape()
# Every shape the tests run (and the candidates ``block_shape`` measures are among them).
SHAPES = (
    DEFAULT_SHAPE,
    Shape(64, 64),
    Shape(16, 64),
    Shape(32, 128, True, 2),
    Shape(64, 128, True, 2),
    Shape(32, 64, True, 2),
    Shape(64, 64, True, 2),
)


def tiling(src_row: int, src_col: int, width: int, mode: int) -> int:
    """How to tile a source with these byte strides: row copies when ``S[:, r]`` is contiguous."""
    return TILING_ROWS if mode == MODE_COPY and src_row == width and src_col != width else TILING_BLOCKS


def tile_count(rows: int, cols: int, tiling: int = TILING_BLOCKS, tile_rows: int = DEFAULT_SHAPE.tile_rows) -> int:
    """Tiles a ``rows x cols`` source is cut into (for ``J_TILE_END``) by a worker whose shape
    has ``tile_rows``."""
    if tiling == TILING_ROWS:
        return -(-cols // ROWS_PER_TILE) if rows else 0
    return -(-rows // tile_rows) * -(-cols // TILE_COLS)
