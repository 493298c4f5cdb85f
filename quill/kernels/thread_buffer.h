/* Scratch memory kept between calls: a fresh buffer per call would be mmap'ed and page-faulted
   every time. Each user keeps its own (the two thread-local variables it passes in), so that a
   kernel calling another never shares one with it. */
#ifndef QUILL_THREAD_BUFFER_H
#define QUILL_THREAD_BUFFER_H

#include <stdlib.h>

/* *buffer, grown to at least `bytes` (64-byte aligned, in whole pages) if it is smaller; NULL when
   it cannot be allocated. */
static inline void *grown_buffer(void **buffer, size_t *capacity, size_t bytes) {
    if (bytes > *capacity) {
        free(*buffer);
        *capacity = (bytes + 4095) & ~(size_t)4095;
        *buffer = aligned_alloc(64, *capacity);
        if (!*buffer) *capacity = 0;
    }
    return *buffer;
}

#endif
