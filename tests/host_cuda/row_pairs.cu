// Host check (built and run by .ci/run where nvcc exists; no GPU needed): v1_row_pairs, which cuts a two-row-tile
// grid's last wave into single-tile blocks. Blocks are dealt to the SMs in turn (the model the rule assumes); then the
// grid it picks covers every row tile once, gives no SM more tiles than whole pairs would, and where it differs from
// whole pairs reaches the least possible, ceil(tiles / SMs). Off, it is whole pairs (the last one holding the odd tile).
#include <algorithm>
#include <cstdio>
#include <vector>

#include "../../src/libortho/ops/csrc/v1.cuh"

using namespace libortho;

int cdiv(int a, int b) { return (a + b - 1) / b; }

// The most row tiles an SM gets, and how many tiles the blocks hold in all: blocks below `pairs` hold two (the last
// block at the end of N may hold one), the others one.
void deal(int tiles, int sms, int pairs, int blocks, int& most, int& held) {
  std::vector<int> per(sms, 0);
  held = 0;
  for (int b = 0; b < blocks; ++b) {
    const int first = b < pairs ? 2 * b : pairs + b;
    const int n = std::max(0, std::min(b < pairs ? 2 : 1, tiles - first));
    per[b % sms] += n;
    held += n;
  }
  most = *std::max_element(per.begin(), per.end());
}

int main() {
  int bad = 0, n = 0, cut = 0;
  for (int sms : {1, 7, 78, 114, 132, 144})
    for (int tiles = 1; tiles <= 6000; ++tiles) {
      const int whole = cdiv(tiles, 2);
      int most_whole = 0, held_whole = 0;
      deal(tiles, sms, whole, whole, most_whole, held_whole);
      for (bool split : {false, true}) {
        int pairs = -1, blocks = -1, most = 0, held = 0;
        v1_row_pairs(tiles, sms, split, pairs, blocks);
        deal(tiles, sms, pairs, blocks, most, held);
        const bool cuts = blocks != whole;  // the launcher runs the cut kernel only then
        const bool ok = held == tiles && held_whole == tiles && most <= most_whole &&
                        (cuts ? split && most == cdiv(tiles, sms) && most < most_whole : true) &&
                        (split || (pairs == whole && blocks == whole));
        if (!ok && bad++ < 5)
          std::printf("sms %d tiles %d split %d: pairs %d blocks %d, most %d (whole pairs %d)\n", sms, tiles, split,
                      pairs, blocks, most, most_whole);
        ++n;
        cut += cuts;
      }
    }
  std::printf("row pairs: %d cases (%d cut), %d wrong\n", n, cut, bad);
  return bad == 0 && cut > 0 ? 0 : 1;
}
