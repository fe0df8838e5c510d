// A wasi:http/proxy service in C for the edge orchestrator: answers every
// request with a greeting naming the workload, the node and the path.
//
// Built by examples/build.sh with clang and wasi-libc, bindings from
// `wit-bindgen c`, made a component by `wasm-tools component new`.

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hello.h"

static void respond(exports_wasi_http_incoming_handler_own_response_outparam_t out, uint16_t status,
                    const char *body) {
    wasi_http_types_own_fields_t headers = wasi_http_types_constructor_fields();
    wasi_http_types_own_outgoing_response_t resp = wasi_http_types_constructor_outgoing_response(headers);
    wasi_http_types_borrow_outgoing_response_t r = wasi_http_types_borrow_outgoing_response(resp);
    wasi_http_types_method_outgoing_response_set_status_code(r, status);
    wasi_http_types_own_outgoing_body_t outgoing;
    if (!wasi_http_types_method_outgoing_response_body(r, &outgoing)) {
        abort();
    }
    wasi_http_types_result_own_outgoing_response_error_code_t result = {.is_err = false, .val.ok = resp};
    wasi_http_types_static_response_outparam_set(out, &result);

    wasi_http_types_own_output_stream_t stream;
    if (wasi_http_types_method_outgoing_body_write(wasi_http_types_borrow_outgoing_body(outgoing), &stream)) {
        size_t len = strlen(body), off = 0;
        while (off < len) {
            // At most 4 KiB per call: what a blocking write guarantees to take.
            size_t n = len - off > 4096 ? 4096 : len - off;
            hello_list_u8_t chunk = {(uint8_t *)body + off, n};
            wasi_io_streams_stream_error_t err;
            if (!wasi_io_streams_method_output_stream_blocking_write_and_flush(
                    wasi_io_streams_borrow_output_stream(stream), &chunk, &err)) {
                break;
            }
            off += n;
        }
        wasi_io_streams_output_stream_drop_own(stream);
    }
    wasi_http_types_error_code_t err;
    wasi_http_types_static_outgoing_body_finish(outgoing, NULL, &err);
}

void exports_wasi_http_incoming_handler_handle(exports_wasi_http_incoming_handler_own_incoming_request_t request,
                                               exports_wasi_http_incoming_handler_own_response_outparam_t response_out) {
    char path[256] = "/";
    hello_string_t p;
    if (wasi_http_types_method_incoming_request_path_with_query(wasi_http_types_borrow_incoming_request(request), &p)) {
        size_t n = p.len < sizeof path - 1 ? p.len : sizeof path - 1;
        memcpy(path, p.ptr, n);
        path[n] = 0;
        hello_string_free(&p);
    }
    wasi_http_types_incoming_request_drop_own(request);

    const char *node = getenv("EDGE_NODE");
    const char *workload = getenv("EDGE_WORKLOAD");
    char body[512];
    snprintf(body, sizeof body, "Hello from C! I am %s on %s; you asked for %s\n", workload ? workload : "hello-c",
             node ? node : "an unknown node", path);
    respond(response_out, 200, body);
}
