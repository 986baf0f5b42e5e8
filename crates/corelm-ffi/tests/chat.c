/* Streams a reply through the C ABI: chat PACKAGE "message". */
#include <stdio.h>
#include "corelm.h"

static void on_text(const char *text, uintptr_t len, void *user_data) {
    (void)user_data;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: chat PACKAGE MESSAGE\n");
        return 2;
    }
    char *error = NULL;
    CorelmModel *model = corelm_model_open(argv[1], CorelmBackendReference, &error);
    if (!model) {
        fprintf(stderr, "error: %s\n", error);
        corelm_string_free(error);
        return 1;
    }
    int64_t n = corelm_chat(model, NULL, argv[2], corelm_sampling_default(), 32, on_text, NULL, &error);
    printf("\n");
    if (n < 0) {
        fprintf(stderr, "error: %s\n", error);
        corelm_string_free(error);
    }
    corelm_model_free(model);
    /* A bad path fails cleanly with a message. */
    if (corelm_model_open("/no/such.mlpackage", CorelmBackendReference, &error) != NULL || error == NULL) {
        return 3;
    }
    fprintf(stderr, "expected error: %s\n", error);
    corelm_string_free(error);
    return n < 0 ? 1 : 0;
}
