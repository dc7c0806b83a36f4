/* Callgrind client requests for Python (through ctypes): count only between count_start and count_stop. */
#include <valgrind/callgrind.h>

void count_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void count_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS_AT("counted"); }
