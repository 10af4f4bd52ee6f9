// Copyright 2022 Contributors to the Parsec project.
// SPDX-License-Identifier: Apache-2.0
pub mod clock_info;
pub mod time_info;
