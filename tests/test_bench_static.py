"""The static kernel analysis (sparse_lm/bench/static.py) finds a kernel's inner loop in SASS text: a hand-written
listing with one backward branch, one forward branch and a straight-line tail."""

from sparse_lm.bench.static import hot_loop

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @P0 BRA 0x0060 ;
        /*0020*/                   LDG.E.U16 R2, desc[UR4][R4.64] ;
        /*0030*/                   FFMA R3, R2, R5, R3 ;
        /*0040*/                   IMAD.WIDE R4, R6, 0x2, R4 ;
        /*0050*/              @!P1 BRA 0x0020 ;
        /*0060*/                   STG.E.128 desc[UR4][R8.64], R12 ;
        /*0070*/                   EXIT ;
"""


def test_hot_loop_is_the_body_of_the_backward_branch():
    n, ops = hot_loop(SASS)
    assert n == 4  # 0x20..0x50: the load, the FMA, the address update and the branch itself
    assert ops == {"LDG.E.U16": 1, "FFMA": 1, "IMAD": 1, "BRA": 1}
    assert hot_loop(SASS.replace("BRA 0x0020", "BRA 0x0070")) == (0, {})  # forward branches only: no loop
