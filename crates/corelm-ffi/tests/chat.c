/* Streams a reply through the C ABI: chat PACKAGE "message". Then exercises every error path
 * of the ABI from C, printing "expected error: ..." for each (the Rust test checks them). */
#include <stdio.h>
#include <string.h>
#include "corelm.h"

static void on_text(const char *text, uintptr_t len, void *user_data) {
    (void)user_data;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
}

/* Returns 1 when `failed` holds and an error message came back (printed, then freed). */
static int expect_error(int failed, char **error, const char *what) {
    if (!failed || *error == NULL) {
        fprintf(stderr, "%s did not fail with a message\n", what);
        return 0;
    }
    fprintf(stderr, "expected error: %s: %s\n", what, *error);
    corelm_string_free(*error);
    *error = NULL;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: chat PACKAGE MESSAGE\n");
        return 2;
    }
    char *error = NULL;
    CorelmModel *model = corelm_model_open(argv[1], CORELM_BACKEND_REFERENCE, NULL, &error);
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
        return 1;
    }
    int ok = 1;
    /* Bad arguments fail cleanly and leave the conversation usable. */
    ok &= expect_error(corelm_chat(model, NULL, NULL, corelm_sampling_default(), 8, on_text, NULL, &error) == -1,
                       &error, "null user_message");
    ok &= expect_error(corelm_chat(model, "\xff\xfe", "hi", corelm_sampling_default(), 8, on_text, NULL, &error) == -1,
                       &error, "system not UTF-8");
    ok &= expect_error(corelm_chat(NULL, NULL, "hi", corelm_sampling_default(), 8, on_text, NULL, &error) == -1,
                       &error, "null model");
    ok &= expect_error(corelm_reset(NULL, &error) == -1, &error, "reset of a null model");
    /* Reset forgets the conversation; the same question then gets the same greedy answer. */
    if (corelm_reset(model, &error) != 0) {
        fprintf(stderr, "reset failed: %s\n", error);
        return 1;
    }
    printf("after reset: ");
    if (corelm_chat(model, NULL, argv[2], corelm_sampling_default(), 32, on_text, NULL, &error) != n) {
        fprintf(stderr, "the reply after reset differs in length\n");
        ok = 0;
    }
    printf("\n");
    corelm_model_free(model);
    corelm_model_free(NULL);
    corelm_string_free(NULL);
    ok &= expect_error(corelm_model_open("/no/such.mlpackage", CORELM_BACKEND_REFERENCE, NULL, &error) == NULL,
                       &error, "missing package");
    ok &= expect_error(corelm_model_open(argv[1], 7, NULL, &error) == NULL, &error, "unknown backend");
    ok &= expect_error(corelm_model_open(NULL, CORELM_BACKEND_REFERENCE, NULL, &error) == NULL, &error,
                       "null path");
    return ok ? 0 : 1;
}
